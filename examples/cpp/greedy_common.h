// What the two greedy decoders (tvm_greedy.cc, aoti_greedy.cc) share, independent of their runtimes: the usage error,
// reading the manifest's "thresholds", checking PROMPT and STEPS, the byte-level tokens, the greedy loop, printing the
// picked ids, and main's error reporting ("<program>: message"; exit code 2 for a UsageError, 1 for any other error).
// Header-only, so that each CMake project (examples/cpp, examples/cpp/aoti) builds on its own.

#ifndef HAM_EXAMPLES_CPP_GREEDY_COMMON_H_
#define HAM_EXAMPLES_CPP_GREEDY_COMMON_H_

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace greedy {

// The argument error type: reported with exit code 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError("cannot read " + path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// The numbers of the first "thresholds": [...] array in the manifest text read from manifest_path (a flat list of
// floats; no JSON library).
inline std::vector<float> ManifestThresholds(const std::string& manifest_path, const std::string& text) {
  size_t key = text.find("\"thresholds\"");
  if (key == std::string::npos) throw UsageError(manifest_path + " has no \"thresholds\"");
  size_t open = text.find('[', key);
  size_t close = text.find(']', open);
  if (open == std::string::npos || close == std::string::npos) {
    throw UsageError(manifest_path + ": \"thresholds\" is not an array");
  }
  std::vector<float> values;
  std::string body = text.substr(open + 1, close - open - 1);
  std::stringstream items(body);
  std::string item;
  while (std::getline(items, item, ',')) {
    if (item.find_first_not_of(" \t\r\n") == std::string::npos) continue;
    char* end = nullptr;
    double v = std::strtod(item.c_str(), &end);
    if (end == item.c_str()) throw UsageError(manifest_path + ": bad threshold '" + item + "'");
    values.push_back(static_cast<float>(v));
  }
  if (values.empty()) throw UsageError(manifest_path + ": empty \"thresholds\"");
  return values;
}

// The PROMPT and STEPS arguments, checked: STEPS a whole number >= 0, PROMPT not empty.
struct Request {
  std::string prompt;
  long steps;
};

inline Request ParseRequest(const std::string& prompt, const std::string& steps_text) {
  char* end = nullptr;
  long steps = std::strtol(steps_text.c_str(), &end, 10);
  if (steps_text.empty() || *end != '\0' || steps < 0) throw UsageError("STEPS must be a whole number >= 0");
  if (prompt.empty()) throw UsageError("PROMPT must not be empty");
  return Request{prompt, steps};
}

// The token ids of a prompt: byte-level vocabulary, token id = UTF-8 byte.
inline std::vector<int64_t> ByteTokens(const std::string& prompt) {
  std::vector<int64_t> ids;
  for (unsigned char c : prompt) ids.push_back(c);
  return ids;
}

// The index of the largest of n floats (the first on ties, as torch.argmax on the CPU).
inline int64_t ArgMax(const float* row, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (row[i] > row[best]) best = i;
  }
  return best;
}

// Picks steps tokens: first (from the prefill), then next(token) for each later one (a decode step). No decode
// step runs after the last pick.
template <typename Next>
std::vector<int64_t> Pick(long steps, int64_t first, Next&& next) {
  std::vector<int64_t> picked;
  int64_t token = first;
  for (long step = 0; step < steps; ++step) {
    picked.push_back(token);
    if (step + 1 == steps) break;
    token = next(token);
  }
  return picked;
}

// Prints the token ids on one line, separated by spaces.
inline void PrintTokens(const std::vector<int64_t>& tokens) {
  for (size_t i = 0; i < tokens.size(); ++i) std::cout << (i ? " " : "") << tokens[i];
  std::cout << "\n";
}

// The message of an error as e.what() gives it.
inline const char* What(const std::exception& e) { return e.what(); }

// main's body: run(argc, argv)'s exit code, or, on an exception, "<program>: message" on stderr and exit code 2 for
// a UsageError, 1 for any other std::exception (message(e) gives its text).
inline int Main(const char* program, int (*run)(int, char**), int argc, char** argv,
                const char* (*message)(const std::exception&) = What) {
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << program << ": " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << program << ": " << message(e) << "\n";
    return 1;
  }
}

}  // namespace greedy

#endif  // HAM_EXAMPLES_CPP_GREEDY_COMMON_H_
