// What the two greedy decoders (tvm_greedy.cc, aoti_greedy.cc) share, independent of their runtimes: the usage error,
// reading the manifest's "thresholds", checking PROMPT and STEPS, the byte-level tokens, the greedy loop, printing the
// picked ids, and main's error reporting ("<program>: message"; exit code 2 for a UsageError, 1 for any other error).
// Header-only, so that each CMake project (examples/cpp, examples/cpp/aoti) builds on its own.

#ifndef HAM_EXAMPLES_CPP_GREEDY_COMMON_H_
#define HAM_EXAMPLES_CPP_GREEDY_COMMON_H_

#include <cerrno>
#include <cmath>
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

// The value text after the first "key": in the manifest text ("" when the key is absent; no JSON library).
inline size_t ValueStart(const std::string& text, const std::string& key) {
  size_t at = text.find("\"" + key + "\"");
  if (at == std::string::npos) return std::string::npos;
  size_t colon = text.find(':', at);
  return colon == std::string::npos ? colon : text.find_first_not_of(" \t\r\n", colon + 1);
}

// The manifest's model layer count ("n_layers" of its "model"): a whole number from 1 to 1024.
inline long ManifestLayers(const std::string& manifest_path, const std::string& text) {
  size_t start = ValueStart(text, "n_layers");
  if (start == std::string::npos) throw UsageError(manifest_path + " has no \"n_layers\"");
  char* end = nullptr;
  errno = 0;
  long layers = std::strtol(text.c_str() + start, &end, 10);
  if (errno != 0 || end == text.c_str() + start || layers < 1 || layers > 1024) {
    throw UsageError(manifest_path + ": \"n_layers\" must be a whole number from 1 to 1024");
  }
  return layers;
}

// The "thresholds" array of the manifest text read from manifest_path: exactly one finite number per layer (the
// compiled programs read that many, and a shorter list would be read past its end).
inline std::vector<float> ManifestThresholds(const std::string& manifest_path, const std::string& text) {
  size_t open = ValueStart(text, "thresholds");
  if (open == std::string::npos) throw UsageError(manifest_path + " has no \"thresholds\"");
  size_t close = text.find(']', open);
  if (text[open] != '[' || close == std::string::npos) {
    throw UsageError(manifest_path + ": \"thresholds\" is not an array");
  }
  std::vector<float> values;
  std::string body = text.substr(open + 1, close - open - 1);
  std::stringstream items(body);
  std::string item;
  while (std::getline(items, item, ',')) {
    if (item.find_first_not_of(" \t\r\n") == std::string::npos) continue;
    char* end = nullptr;
    errno = 0;
    double v = std::strtod(item.c_str(), &end);
    bool trailing = std::string(end).find_first_not_of(" \t\r\n") != std::string::npos;
    if (end == item.c_str() || trailing || errno != 0 || !std::isfinite(v)) {
      throw UsageError(manifest_path + ": bad threshold '" + item + "' (a finite number is needed)");
    }
    values.push_back(static_cast<float>(v));
  }
  long layers = ManifestLayers(manifest_path, text);
  if (static_cast<long>(values.size()) != layers) {
    throw UsageError(manifest_path + ": \"thresholds\" holds " + std::to_string(values.size()) +
                     " values; the model has " + std::to_string(layers) + " layers");
  }
  return values;
}

// The PROMPT and STEPS arguments, checked: STEPS digits only, from 0 to kMaxSteps; PROMPT not empty.
struct Request {
  std::string prompt;
  long steps;
};

constexpr long kMaxSteps = 65536;  // as ham-export check --steps

inline Request ParseRequest(const std::string& prompt, const std::string& steps_text) {
  bool digits = !steps_text.empty() && steps_text.find_first_not_of("0123456789") == std::string::npos;
  errno = 0;
  long steps = digits ? std::strtol(steps_text.c_str(), nullptr, 10) : -1;
  if (!digits || errno != 0 || steps > kMaxSteps) {
    throw UsageError("STEPS must be a whole number from 0 to " + std::to_string(kMaxSteps) + ", got '" + steps_text +
                     "'");
  }
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
