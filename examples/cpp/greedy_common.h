// What the greedy decoders (ort_greedy.cc, tvm_greedy.cc, aoti_greedy.cc, trt_greedy.cc) share, independent of their
// runtimes: the usage error, file and folder tests, the executable's folder, reading and checking the manifest (with
// nlohmann/json), checking PROMPT and STEPS, the byte-level tokens, the greedy loop, printing the picked ids, and
// main's error reporting ("<program>: message"; exit code 2 for a UsageError, 1 for any other error). Header-only, so
// that each CMake project (examples/cpp, examples/cpp/aoti) builds on its own.

#ifndef HAM_EXAMPLES_CPP_GREEDY_COMMON_H_
#define HAM_EXAMPLES_CPP_GREEDY_COMMON_H_

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace greedy {

// The argument error type: reported with exit code 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline bool IsFile(const std::string& path) {
  struct stat info;
  return stat(path.c_str(), &info) == 0 && S_ISREG(info.st_mode);
}

inline bool IsDir(const std::string& path) {
  struct stat info;
  return stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

// The folder of a path ("." when it has none).
inline std::string Parent(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// The folder of this executable (from /proc/self/exe).
inline std::string ExecutableDir() {
  std::vector<char> buffer(4096);
  ssize_t n = readlink("/proc/self/exe", buffer.data(), buffer.size() - 1);
  if (n <= 0) return ".";
  return Parent(std::string(buffer.data(), static_cast<size_t>(n)));
}

inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError("cannot read " + path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// The manifest (ham_export.json), parsed with nlohmann/json and checked as ham_export.backends.manifest checks it:
// the fields these programs read must be present and of their type (a capacity written as a string, a
// format_version of true, thresholds that are not numbers, one per layer, are refused), and the programs' listed
// shapes must agree with the capacity, the layer count and the vocabulary.
struct Manifest {
  std::string path;
  nlohmann::json data;
  std::string backend, dtype;
  int64_t capacity = 0, n_layers = 0, vocab_size = 0;
  std::vector<float> thresholds;

  // The string field key ("" when absent); a field of another type is refused.
  std::string String(const std::string& key) const {
    auto it = data.find(key);
    if (it == data.end()) return "";
    if (!it->is_string()) throw UsageError(path + ": \"" + key + "\" must be a string");
    return it->get<std::string>();
  }
};

constexpr int64_t kMaxCapacity = int64_t{1} << 20;  // as ham_export.backends.artifact.MAX_CAPACITY
constexpr int64_t kMaxLayers = 1024;

// object[key] as a whole number in [low, high] (JSON booleans are not numbers here).
inline int64_t WholeNumber(const std::string& path, const nlohmann::json& object, const std::string& key, int64_t low,
                           int64_t high) {
  auto it = object.find(key);
  if (it == object.end()) throw UsageError(path + " has no \"" + key + "\"");
  if (!it->is_number_integer() || it->get<int64_t>() < low || it->get<int64_t>() > high) {
    throw UsageError(path + ": \"" + key + "\" must be a whole number from " + std::to_string(low) + " to " +
                     std::to_string(high) + ", got " + it->dump());
  }
  return it->get<int64_t>();
}

// Each listed program output whose shape the capacity, layer count or vocabulary fixes agrees with them.
inline void CheckProgramShapes(const Manifest& m) {
  auto programs = m.data.find("programs");
  if (programs == m.data.end() || !programs->is_object()) throw UsageError(m.path + " has no \"programs\" object");
  for (const char* program : {"prefill", "decode"}) {
    auto it = programs->find(program);
    if (it == programs->end() || !it->is_object() || !it->contains("outputs") || !(*it)["outputs"].is_array()) {
      throw UsageError(m.path + ": \"programs\" has no " + program + " outputs");
    }
    int64_t states = 0;
    for (const auto& out : (*it)["outputs"]) {
      if (!out.is_object() || !out.contains("name") || !out["name"].is_string() || !out.contains("shape") ||
          !out["shape"].is_array()) {
        throw UsageError(m.path + ": a " + program + " output has no name or shape");
      }
      const std::string name = out["name"].get<std::string>();
      const auto& shape = out["shape"];
      auto dim = [&](size_t i) {
        return i < shape.size() && shape[i].is_number_integer() ? shape[i].get<int64_t>() : -1;
      };
      bool cache =
          name.size() > 8 && (name.find(".k_cache") != std::string::npos || name.find(".v_cache") != std::string::npos);
      bool ok = true;
      if (cache) ok = shape.size() == 4 && dim(2) == m.capacity;
      if (name.find(".score_cache") != std::string::npos) ok = shape.size() == 2 && dim(1) == m.capacity;
      if (name == "logits") ok = !shape.empty() && dim(shape.size() - 1) == m.vocab_size;
      if (!ok) {
        throw UsageError(m.path + ": " + program + " output " + name + " has shape " + shape.dump() +
                         ", which does not agree with capacity " + std::to_string(m.capacity) + " and vocab_size " +
                         std::to_string(m.vocab_size));
      }
      if (name.rfind("present.", 0) == 0) ++states;
    }
    if (states != 6 * m.n_layers) {
      throw UsageError(m.path + ": the " + std::string(program) + " program lists " + std::to_string(states) +
                       " state outputs; " + std::to_string(m.n_layers) + " layers have " +
                       std::to_string(6 * m.n_layers));
    }
  }
}

// Reads and checks the manifest at path, of the given backend ("" for any).
inline Manifest ReadManifest(const std::string& path, const std::string& backend) {
  Manifest m;
  m.path = path;
  try {
    m.data = nlohmann::json::parse(ReadFile(path));
  } catch (const nlohmann::json::exception& e) {
    throw UsageError(path + " is not JSON: " + e.what());
  }
  if (!m.data.is_object()) throw UsageError(path + " is not a JSON object");
  if (m.String("format") != "ham-export/artifact") throw UsageError(path + " is not a ham-export manifest");
  WholeNumber(path, m.data, "format_version", 1, 1);
  m.backend = m.String("backend");
  if (!backend.empty() && m.backend != backend) {
    throw UsageError(path + " describes a '" + m.backend + "' artifact, not a " + backend + " one");
  }
  m.dtype = m.String("dtype");
  if (m.dtype != "fp32" && m.dtype != "fp16") throw UsageError(path + ": \"dtype\" must be fp32 or fp16");
  m.capacity = WholeNumber(path, m.data, "capacity", 1, kMaxCapacity);
  auto model = m.data.find("model");
  if (model == m.data.end() || !model->is_object()) throw UsageError(path + " has no \"model\" object");
  m.n_layers = WholeNumber(path, *model, "n_layers", 1, kMaxLayers);
  m.vocab_size = WholeNumber(path, *model, "vocab_size", 1, int64_t{1} << 31);
  // Exactly one finite number per layer: the compiled programs read that many, and a shorter list would be read
  // past its end.
  auto thresholds = m.data.find("thresholds");
  if (thresholds == m.data.end() || !thresholds->is_array()) {
    throw UsageError(path + ": \"thresholds\" must be an array of numbers");
  }
  for (const auto& v : *thresholds) {
    if (!v.is_number() || !std::isfinite(v.get<double>())) {
      throw UsageError(path + ": bad threshold " + v.dump() + " (a finite number is needed)");
    }
    m.thresholds.push_back(v.get<float>());
  }
  if (static_cast<int64_t>(m.thresholds.size()) != m.n_layers) {
    throw UsageError(path + ": \"thresholds\" holds " + std::to_string(m.thresholds.size()) +
                     " values; the model has " + std::to_string(m.n_layers) + " layers");
  }
  CheckProgramShapes(m);
  return m;
}

// The checked thresholds of the manifest at manifest_path (its text already read), whatever its backend.
inline std::vector<float> ManifestThresholds(const std::string& manifest_path, const std::string& /*text*/) {
  return ReadManifest(manifest_path, "").thresholds;
}

// A prompt's bytes must be token ids of the model's vocabulary.
inline void CheckPromptVocabulary(const Manifest& m, const std::string& prompt) {
  for (unsigned char c : prompt) {
    if (c >= m.vocab_size) {
      throw UsageError("PROMPT byte " + std::to_string(c) + " is outside the model's vocabulary of " +
                       std::to_string(m.vocab_size));
    }
  }
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
