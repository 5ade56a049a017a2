// Greedy decoding with a ham-export ONNX Runtime artifact (prefill.onnx, decode.onnx, ham_export.json), from C++
// with ONNX Runtime's C++ API and the libonnxruntime of the onnxruntime wheel.
//
//   ort_greedy [--ops LIB] DIR PROMPT STEPS
//
// The manifest is read with nlohmann/json and checked (greedy::ReadManifest); every buffer is sized from it. An
// artifact of the custom form (ham.ai nodes) needs the op library libham_ort_ops.so: LIB, else $HAM_ORT_OPS_LIB,
// else the one next to this executable. Each session's inputs and outputs must be the ones the manifest lists
// (names, element types, fixed dims), as ham_export's ONNX Runtime runner checks them. The UTF-8 bytes of PROMPT are
// prefilled as one sequence at the manifest's thresholds, then the most likely token is picked STEPS times (the
// first from the prefill, each later one from a decode step). Decode binds its inputs and outputs with IOBinding;
// where the form writes the caches in place (custom or standard ops under the drop policy, as the Python runner),
// each cache is bound as both the input and the output of a step, so a step writes only its new entries.
//
// Output: the token ids on one line; then "# decode <ms> ms/step over <n> steps; state <bytes> bytes" (the bytes of
// every state tensor the program holds, caches included). A routed token that found a cache full is reported once
// on stderr, with the policy that applied ("... (policy drop: not stored)"); decoding goes on, as in Python.
//
// Exit codes: 0 ok, 2 bad arguments, manifest or op library, 1 an ONNX Runtime error.

#include <onnxruntime_cxx_api.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "greedy_common.h"

namespace {

using greedy::UsageError;

constexpr const char* kOpLibrary = "libham_ort_ops.so";
constexpr const char* kOpLibraryEnv = "HAM_ORT_OPS_LIB";
constexpr size_t kHead = 4;  // logits, scores, routed, overflow; then 6 state tensors a layer

using greedy::ExecutableDir;
using greedy::IsFile;

// The manifest's dtype names of ONNX element types.
std::string TypeName(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
      return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
      return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL:
      return "bool";
    default:
      return "type " + std::to_string(static_cast<int>(type));
  }
}

// Whether the decode step writes each cache in place (ham_export.backends.onnxruntime.shares_caches).
bool SharesCaches(const greedy::Manifest& m) {
  std::string form = m.String("ops");
  return (form == "custom" || form == "standard") && m.String("policy") == "drop";
}

bool IsSharedCache(const std::string& name) {
  for (const char* field : {".k_cache", ".v_cache", ".score_cache"}) {
    const std::string f(field);
    if (name.size() > f.size() && name.compare(name.size() - f.size(), f.size(), f) == 0) return true;
  }
  return false;
}

// The session's inputs (or outputs) are the ones the manifest lists for the program: names in order, element types,
// and every dim the graph fixes equal to the listed one (ham_export.backends.programs.check_graph).
void CheckIo(const greedy::Manifest& m, const std::string& program, const char* kind, size_t count,
             const std::vector<std::string>& names, const std::vector<Ort::TypeInfo>& types) {
  const nlohmann::json& listed = m.data["programs"][program][kind];
  const std::string where = m.path + ": " + program + ".onnx";
  if (!listed.is_array() || listed.size() != count) {
    throw UsageError(where + " has " + std::to_string(count) + " " + kind + "; the manifest lists " +
                     std::to_string(listed.is_array() ? listed.size() : 0));
  }
  for (size_t i = 0; i < count; ++i) {
    const nlohmann::json& t = listed[i];
    if (t.value("name", "") != names[i]) {
      throw UsageError(where + " " + kind + " #" + std::to_string(i) + " is " + names[i] + "; the manifest says " +
                       t.value("name", ""));
    }
    auto info = types[i].GetTensorTypeAndShapeInfo();
    if (TypeName(info.GetElementType()) != t.value("dtype", "")) {
      throw UsageError(where + ": " + names[i] + " is " + TypeName(info.GetElementType()) +
                       " in the graph; the manifest says " + t.value("dtype", ""));
    }
    std::vector<int64_t> shape = info.GetShape();
    const nlohmann::json& want = t["shape"];
    bool ok = want.is_array() && want.size() == shape.size();
    for (size_t d = 0; ok && d < shape.size(); ++d) {
      if (shape[d] >= 0 && want[d].is_number_integer() && want[d].get<int64_t>() != shape[d]) ok = false;
    }
    if (!ok) throw UsageError(where + ": " + names[i] + " has another shape in the graph than " + want.dump());
  }
}

struct Session {
  Ort::Session session{nullptr};
  std::vector<std::string> inputs, outputs;
};

Session Open(const Ort::Env& env, const Ort::SessionOptions& options, const greedy::Manifest& m, const std::string& dir,
             const std::string& program) {
  const nlohmann::json& entry = m.data["programs"][program];
  std::string file = entry.contains("file") && entry["file"].is_string() ? entry["file"].get<std::string>() : "";
  if (file.empty() || file.find('/') != std::string::npos) {
    throw UsageError(m.path + ": the " + program + " program names no file in its folder");
  }
  std::string path = dir + "/" + file;
  if (!IsFile(path)) throw UsageError("no " + program + " program at " + path);
  Session s;
  s.session = Ort::Session(env, path.c_str(), options);
  Ort::AllocatorWithDefaultOptions allocator;
  std::vector<Ort::TypeInfo> in_types, out_types;
  for (size_t i = 0; i < s.session.GetInputCount(); ++i) {
    s.inputs.push_back(s.session.GetInputNameAllocated(i, allocator).get());
    in_types.push_back(s.session.GetInputTypeInfo(i));
  }
  for (size_t i = 0; i < s.session.GetOutputCount(); ++i) {
    s.outputs.push_back(s.session.GetOutputNameAllocated(i, allocator).get());
    out_types.push_back(s.session.GetOutputTypeInfo(i));
  }
  CheckIo(m, program, "inputs", s.inputs.size(), s.inputs, in_types);
  CheckIo(m, program, "outputs", s.outputs.size(), s.outputs, out_types);
  return s;
}

// The op library for a custom-form artifact: --ops LIB, $HAM_ORT_OPS_LIB, or the one next to this executable.
void RegisterOps(Ort::SessionOptions& options, std::string library) {
  if (library.empty() && std::getenv(kOpLibraryEnv) != nullptr) library = std::getenv(kOpLibraryEnv);
  if (library.empty()) library = ExecutableDir() + "/" + kOpLibrary;
  if (!IsFile(library)) {
    throw UsageError("op library not found at " + library + "; the artifact's ham.ai nodes need " + kOpLibrary +
                     " (bash scripts/build-ort-ops.sh builds it into ham_export/lib/): pass --ops LIB or set " +
                     kOpLibraryEnv);
  }
  try {
    options.RegisterCustomOpsLibrary(library.c_str());
  } catch (const Ort::Exception& e) {
    throw UsageError("cannot load the op library " + library + ": " + e.what());
  }
}

template <typename T>
Ort::Value Tensor(std::vector<T>& data, const std::vector<int64_t>& shape) {
  static const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  return Ort::Value::CreateTensor<T>(cpu, data.data(), data.size(), shape.data(), shape.size());
}

// The argmax of the last position of float32 logits [1, T, V] or [1, V].
int64_t LastArgMax(const Ort::Value& logits) {
  auto info = logits.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) throw std::runtime_error("logits not float32");
  int64_t vocab = info.GetShape().back();
  int64_t rows = static_cast<int64_t>(info.GetElementCount()) / vocab;
  return greedy::ArgMax(logits.GetTensorData<float>() + (rows - 1) * vocab, vocab);
}

size_t Bytes(const Ort::Value& v) {
  auto info = v.GetTensorTypeAndShapeInfo();
  size_t size = 4;
  switch (info.GetElementType()) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
      size = 8;
      break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL:
      size = 1;
      break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
      size = 2;
      break;
    default:
      break;
  }
  return info.GetElementCount() * size;
}

// Reports, once, a routed token that found a cache full (overflow [L, 1] > 0), with the policy that applied.
struct OverflowNote {
  std::string policy;
  bool said = false;

  void Check(const Ort::Value& overflow, const char* call) {
    auto n = overflow.GetTensorTypeAndShapeInfo().GetElementCount();
    const int64_t* values = overflow.GetTensorData<int64_t>();
    for (size_t layer = 0; layer < n && !said; ++layer) {
      if (values[layer] > 0) {
        std::cerr << "ort_greedy: the cache of layer " << layer << " was full at the " << call << ": " << values[layer]
                  << " routed token(s) found no room (policy " << policy << ": "
                  << (policy == "drop" ? "not stored" : "the lowest-score entry replaced if beaten") << ")\n";
        said = true;
      }
    }
  }
};

int Run(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  std::string ops;
  if (args.size() >= 2 && args[0] == "--ops") {
    ops = args[1];
    args.erase(args.begin(), args.begin() + 2);
  }
  if (args.size() != 3) throw UsageError("usage: ort_greedy [--ops LIB] DIR PROMPT STEPS");
  const std::string dir = args[0];
  const greedy::Request request = greedy::ParseRequest(args[1], args[2]);
  const greedy::Manifest m = greedy::ReadManifest(dir + "/ham_export.json", "onnxruntime");
  greedy::CheckPromptVocabulary(m, request.prompt);
  if (m.dtype != "fp32") throw UsageError(m.path + ": this program runs fp32 artifacts; this one is " + m.dtype);
  const std::string form = m.String("ops");
  if (form != "custom" && form != "standard" && form != "portable") {
    throw UsageError(m.path + ": \"ops\" must be custom, standard or portable");
  }

  Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "ort_greedy");
  Ort::SessionOptions options;
  options.SetIntraOpNumThreads(1);
  if (form == "custom") RegisterOps(options, ops);
  Session prefill = Open(env, options, m, dir, "prefill");
  Session decode = Open(env, options, m, dir, "decode");
  auto names = [](const std::vector<std::string>& v) {
    std::vector<const char*> p;
    for (const auto& s : v) p.push_back(s.c_str());
    return p;
  };

  std::vector<int64_t> ids = greedy::ByteTokens(request.prompt);
  std::vector<float> thresholds = m.thresholds;
  Ort::Value thr = Tensor(thresholds, {static_cast<int64_t>(thresholds.size())});
  std::vector<Ort::Value> feeds;
  feeds.push_back(Tensor(ids, {1, static_cast<int64_t>(ids.size())}));
  feeds.push_back(Tensor(thresholds, {static_cast<int64_t>(thresholds.size())}));
  auto in_names = names(prefill.inputs), out_names = names(prefill.outputs);
  std::vector<Ort::Value> outputs = prefill.session.Run(Ort::RunOptions{nullptr}, in_names.data(), feeds.data(),
                                                        feeds.size(), out_names.data(), out_names.size());
  OverflowNote note{m.String("policy")};
  note.Check(outputs[3], "prefill");
  // The state: every output after the head, in the order decode takes it back as past.*.
  std::vector<Ort::Value> state;
  for (size_t i = kHead; i < outputs.size(); ++i) state.push_back(std::move(outputs[i]));
  if (state.size() + 2 != decode.inputs.size()) throw UsageError(m.path + ": prefill and decode disagree on the state");

  const bool shared = SharesCaches(m);
  std::vector<int64_t> token(1);
  Ort::Value token_value = Tensor(token, {1});
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  double decode_seconds = 0;
  long decode_steps = 0;

  greedy::PrintTokens(greedy::Pick(request.steps, LastArgMax(outputs[0]), [&](int64_t next) {
    token[0] = next;
    Ort::IoBinding binding(decode.session);
    binding.BindInput("token", token_value);
    binding.BindInput("thresholds", thr);
    for (size_t i = 0; i < state.size(); ++i) binding.BindInput(decode.inputs[i + 2].c_str(), state[i]);
    // Fresh outputs (the head, and the state a step makes anew) are allocated by ONNX Runtime; a shared cache is
    // bound to the buffer it came in, which the step writes in place.
    std::vector<bool> in_place(decode.outputs.size());
    for (size_t i = 0; i < decode.outputs.size(); ++i) {
      const std::string& name = decode.outputs[i];
      in_place[i] = i >= kHead && shared && IsSharedCache(name);
      if (in_place[i]) {
        binding.BindOutput(name.c_str(), state[i - kHead]);
      } else {
        binding.BindOutput(name.c_str(), cpu);
      }
    }
    auto start = std::chrono::steady_clock::now();
    decode.session.Run(Ort::RunOptions{nullptr}, binding);
    decode_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ++decode_steps;
    std::vector<Ort::Value> produced = binding.GetOutputValues();  // in binding order: the graph's
    std::vector<Ort::Value> head;
    for (size_t i = 0; i < produced.size(); ++i) {
      if (i < kHead) {
        head.push_back(std::move(produced[i]));
      } else if (!in_place[i]) {
        state[i - kHead] = std::move(produced[i]);
      }  // else: the cache written in place, already in state
    }
    note.Check(head[3], "decode");
    return LastArgMax(head[0]);
  }));
  size_t held = 0;
  for (const Ort::Value& v : state) held += Bytes(v);
  std::cout << "# decode " << (decode_steps ? 1e3 * decode_seconds / decode_steps : 0.0) << " ms/step over "
            << decode_steps << " steps; state " << held << " bytes\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return greedy::Main("ort_greedy", Run, argc, argv); }
