// Greedy decoding with a ham-export TensorRT artifact (prefill.plan, decode.plan, ham_export.json), from C++ with the
// TensorRT runtime only (no Python).
//
//   trt_greedy [--plugins LIB] DIR PROMPT STEPS
//
// Deserializes both engines, prefills the UTF-8 bytes of PROMPT as one sequence at the manifest's thresholds, then
// picks the most likely token STEPS times (the first from the prefill's last position, each later one from a decode
// step) and prints the STEPS token ids on one line, as tvm_greedy and aoti_greedy do. The state stays on the GPU:
// each decode step binds every past cache and its present output to one buffer (the plugins write the new entries
// in place), and the other state tensors alternate between two buffers. An artifact built with --plugins cpp needs
// the plugin library (--plugins LIB, default libham_trt_plugins.so next to the executable); a qdp artifact needs
// none (its kernels are PTX inside the engines).
//
// Exit codes: 0 ok, 2 bad arguments, manifest or plugin library, 1 a TensorRT or CUDA error.

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "greedy_common.h"

namespace {

using greedy::UsageError;

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* message) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "TensorRT: " << message << "\n";
  }
};

void Cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

// A device buffer that frees itself.
struct DeviceBuffer {
  void* data = nullptr;
  size_t bytes = 0;
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : bytes(n) { Cuda(cudaMalloc(&data, n == 0 ? 1 : n), "cudaMalloc"); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (data != nullptr) cudaFree(data);
  }
};
using Buffer = std::shared_ptr<DeviceBuffer>;

size_t ElementBytes(nvinfer1::DataType type) {
  switch (type) {
    case nvinfer1::DataType::kFLOAT:
    case nvinfer1::DataType::kINT32:
      return 4;
    case nvinfer1::DataType::kHALF:
    case nvinfer1::DataType::kBF16:
      return 2;
    case nvinfer1::DataType::kINT64:
      return 8;
    case nvinfer1::DataType::kBOOL:
    case nvinfer1::DataType::kUINT8:
    case nvinfer1::DataType::kINT8:
      return 1;
    default:
      throw std::runtime_error("an I/O tensor has a type this example does not handle");
  }
}

int64_t Volume(const nvinfer1::Dims& dims) {
  int64_t n = 1;
  for (int32_t i = 0; i < dims.nbDims; ++i) {
    if (dims.d[i] < 0) throw std::runtime_error("an output shape is still dynamic after setting the inputs");
    n *= dims.d[i];
  }
  return n;
}

float HalfToFloat(uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  float value = 0.0f;
  if (exponent == 0) {
    value = std::ldexp(static_cast<float>(mantissa), -24);
  } else if (exponent == 31) {
    value = mantissa ? NAN : INFINITY;
  } else {
    value = std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
  }
  return sign ? -value : value;
}

// The manifest's "plugins" value ("qdp" or "cpp").
std::string ManifestPlugins(const greedy::Manifest& m) {
  std::string plugins = m.String("plugins");
  if (plugins != "qdp" && plugins != "cpp") throw UsageError(m.path + ": \"plugins\" must be qdp or cpp");
  return plugins;
}

// One engine and its execution context.
struct Engine {
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;
};

Engine Load(nvinfer1::IRuntime& runtime, const std::string& path) {
  const std::string plan = greedy::ReadFile(path);
  Engine e;
  e.engine.reset(runtime.deserializeCudaEngine(plan.data(), plan.size()));
  if (!e.engine)
    throw UsageError("TensorRT cannot load " + path + " (another TensorRT or GPU, or its plugins missing)");
  e.context.reset(e.engine->createExecutionContext());
  if (!e.context) throw std::runtime_error("cannot create an execution context for " + path);
  return e;
}

// Runs one engine: binds the inputs (name -> buffer, shape), allocates every output not in `bound`, enqueues, waits.
// Returns the outputs by name.
std::map<std::string, Buffer> Run(Engine& e, const std::map<std::string, std::pair<Buffer, nvinfer1::Dims>>& inputs,
                                  const std::map<std::string, Buffer>& bound, cudaStream_t stream) {
  for (const auto& [name, input] : inputs) {
    if (!e.context->setInputShape(name.c_str(), input.second)) throw std::runtime_error("bad shape for " + name);
    if (!e.context->setTensorAddress(name.c_str(), input.first->data)) throw std::runtime_error("cannot bind " + name);
  }
  std::map<std::string, Buffer> outputs;
  for (int32_t i = 0; i < e.engine->getNbIOTensors(); ++i) {
    const char* name = e.engine->getIOTensorName(i);
    if (e.engine->getTensorIOMode(name) != nvinfer1::TensorIOMode::kOUTPUT) continue;
    auto shared = bound.find(name);
    Buffer buffer = shared != bound.end()
                        ? shared->second
                        : std::make_shared<DeviceBuffer>(Volume(e.context->getTensorShape(name)) *
                                                         ElementBytes(e.engine->getTensorDataType(name)));
    if (!e.context->setTensorAddress(name, buffer->data)) throw std::runtime_error(std::string("cannot bind ") + name);
    outputs[name] = buffer;
  }
  if (!e.context->enqueueV3(stream)) throw std::runtime_error("TensorRT failed to run an engine");
  Cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  return outputs;
}

// The argmax of the last row of the logits output ([1, T, V] or [1, V], float32 or float16).
int64_t LastArgMax(Engine& e, const Buffer& logits) {
  const nvinfer1::Dims dims = e.context->getTensorShape("logits");
  const int64_t vocab = dims.d[dims.nbDims - 1];
  const int64_t rows = Volume(dims) / vocab;
  const nvinfer1::DataType type = e.engine->getTensorDataType("logits");
  const size_t item = ElementBytes(type);
  std::vector<char> host(vocab * item);
  Cuda(cudaMemcpy(host.data(), static_cast<char*>(logits->data) + (rows - 1) * vocab * item, host.size(),
                  cudaMemcpyDeviceToHost),
       "cudaMemcpy");
  std::vector<float> row(vocab);
  for (int64_t i = 0; i < vocab; ++i) {
    if (type == nvinfer1::DataType::kFLOAT) {
      std::memcpy(&row[i], host.data() + i * 4, 4);
    } else {
      uint16_t h = 0;
      std::memcpy(&h, host.data() + i * 2, 2);
      row[i] = HalfToFloat(h);
    }
  }
  return greedy::ArgMax(row.data(), vocab);
}

Buffer Upload(const void* data, size_t bytes) {
  auto buffer = std::make_shared<DeviceBuffer>(bytes);
  Cuda(cudaMemcpy(buffer->data, data, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
  return buffer;
}

nvinfer1::Dims Shape(std::initializer_list<int64_t> sizes) {
  nvinfer1::Dims dims{};
  dims.nbDims = static_cast<int32_t>(sizes.size());
  int32_t i = 0;
  for (int64_t s : sizes) dims.d[i++] = s;
  return dims;
}

bool IsAliasedCache(const std::string& name) {
  for (const char* field : {".k_cache", ".v_cache", ".score_cache"}) {
    const std::string suffix = field;
    if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      return true;
    }
  }
  return false;
}

int RunMain(int argc, char** argv) {
  std::string library;
  int first = 1;
  if (argc > 2 && std::string(argv[1]) == "--plugins") {
    library = argv[2];
    first = 3;
  }
  if (argc - first != 3) throw UsageError("usage: trt_greedy [--plugins LIB] DIR PROMPT STEPS");
  const std::string dir = argv[first];
  const greedy::Request request = greedy::ParseRequest(argv[first + 1], argv[first + 2]);
  const greedy::Manifest manifest = greedy::ReadManifest(dir + "/ham_export.json", "tensorrt");
  greedy::CheckPromptVocabulary(manifest, request.prompt);
  std::vector<float> thresholds = manifest.thresholds;

  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
  if (!runtime) throw std::runtime_error("cannot create the TensorRT runtime");
  if (ManifestPlugins(manifest) == "cpp") {
    if (library.empty()) library = "libham_trt_plugins.so";
    if (runtime->getPluginRegistry().loadLibrary(library.c_str()) == nullptr) {
      throw UsageError("cannot load the plugin library " + library + " (pass --plugins LIB)");
    }
  }
  Engine prefill = Load(*runtime, dir + "/prefill.plan");
  Engine decode = Load(*runtime, dir + "/decode.plan");
  cudaStream_t stream = nullptr;
  Cuda(cudaStreamCreate(&stream), "cudaStreamCreate");

  const std::vector<int64_t> ids = greedy::ByteTokens(request.prompt);
  const int64_t layers = static_cast<int64_t>(thresholds.size());
  Buffer thr = Upload(thresholds.data(), thresholds.size() * sizeof(float));
  Buffer tokens = Upload(ids.data(), ids.size() * sizeof(int64_t));
  std::map<std::string, Buffer> out =
      Run(prefill,
          {{"tokens", {tokens, Shape({1, static_cast<int64_t>(ids.size())})}}, {"thresholds", {thr, Shape({layers})}}},
          {}, stream);
  const int64_t first_token = LastArgMax(prefill, out.at("logits"));

  // present.<i>.<field> of one call is past.<i>.<field> of the next.
  std::map<std::string, Buffer> state;
  for (const auto& [name, buffer] : out) {
    if (name.rfind("present.", 0) == 0) state["past." + name.substr(8)] = buffer;
  }
  std::map<std::string, nvinfer1::Dims> shapes;
  for (const auto& [past, buffer] : state)
    shapes[past] = prefill.context->getTensorShape(("present." + past.substr(5)).c_str());

  greedy::PrintTokens(greedy::Pick(request.steps, first_token, [&](int64_t token) {
    Buffer token_buffer = Upload(&token, sizeof(token));
    std::map<std::string, std::pair<Buffer, nvinfer1::Dims>> inputs{{"token", {token_buffer, Shape({1})}},
                                                                    {"thresholds", {thr, Shape({layers})}}};
    std::map<std::string, Buffer> bound;  // each cache's output on its input's buffer: written in place
    for (const auto& [past, buffer] : state) {
      inputs[past] = {buffer, shapes.at(past)};
      if (IsAliasedCache(past)) bound["present." + past.substr(5)] = buffer;
    }
    std::map<std::string, Buffer> step = Run(decode, inputs, bound, stream);
    for (auto& [past, buffer] : state) buffer = step.at("present." + past.substr(5));
    return LastArgMax(decode, step.at("logits"));
  }));
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return greedy::Main("trt_greedy", RunMain, argc, argv); }
