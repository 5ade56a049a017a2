// The HAM ops as TensorRT IPluginV3 plugins: libham_trt_plugins.so, namespace "ham_cpp", version "1".
//
// One plugin class and one creator class serve the three ops; everything op-specific comes from the op's spec
// (runtimes/common/ham_op_spec.h, generated from ham_export/ops/spec.py) through ham_trt_rules.h: the plugin name
// (the rewritten ONNX node's op type, "Ham" + the ONNX op name), output shapes from the spec's shape letters, dtypes
// (the float type T in float32 or float16, int64, and int32 for the bool inputs), the aliased outputs (the caches of
// HamCacheAppend, in place; TensorRT's preview feature kALIASED_PLUGIN_IO_10_03 must be on), the attribute
// "policy". The input check is ham_op_check.h's, run at every shape change. The kernels are the CUDA kernels the
// ONNX Runtime library uses (runtimes/common/ham_cuda_kernels.cu), with int32 routed masks; a cache length outside
// [0, C] is refused on the device as the spec says (nothing written, NaN attention, overflow -1).
//
// Loading: IPluginRegistry::loadLibrary (trtexec --dynamicPlugins=libham_trt_plugins.so) finds getCreators and
// setLoggerFinder below. Built by plugins_trt/cpp/CMakeLists.txt where TensorRT's headers are found.
#include <NvInfer.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

#include "ham_cuda_kernels.h"
#include "ham_op_check.h"
#include "ham_op_spec.h"
#include "ham_trt_rules.h"

namespace ham {
namespace trt_plugins {
namespace {

namespace nv = nvinfer1;
using Severity = nv::ILogger::Severity;

// --- logging through TensorRT's logger (set by setLoggerFinder when the registry loads the library) ------------------
std::mutex gLoggerMutex;
nv::ILoggerFinder* gLoggerFinder = nullptr;

void Log(Severity severity, const std::string& message) {
  std::lock_guard<std::mutex> lock(gLoggerMutex);
  nv::ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
  if (logger != nullptr) logger->log(severity, message.c_str());
}

const char* DTypeName(nv::DataType type) {
  switch (type) {
    case nv::DataType::kFLOAT:
      return "float32";
    case nv::DataType::kHALF:
      return "float16";
    case nv::DataType::kBF16:
      return "bfloat16";
    case nv::DataType::kINT32:
      return "int32";
    case nv::DataType::kINT64:
      return "int64";
    case nv::DataType::kBOOL:
      return "bool";
    default:
      return "an unsupported type";
  }
}

bool IsKernelFloat(nv::DataType type) { return type == nv::DataType::kFLOAT || type == nv::DataType::kHALF; }

std::string FieldString(const nv::PluginField& field) {
  const char* data = static_cast<const char*>(field.data);
  if (data == nullptr || field.length <= 0) return "";
  std::string value(data, static_cast<size_t>(field.length));
  const size_t end = value.find('\0');
  return end == std::string::npos ? value : value.substr(0, end);
}

// --- the plugin ------------------------------------------------------------------------------------------------------
class HamPlugin final : public nv::IPluginV3,
                        public nv::IPluginV3OneCore,
                        public nv::IPluginV3OneBuildV2,
                        public nv::IPluginV3OneRuntime {
 public:
  // policy: the index of the attribute's choice (spec::cache_append::Policy), 0 for the ops without one.
  HamPlugin(const spec::Op& op, int policy) : op_(&op), policy_(policy), name_(trt_rules::PluginName(op)) {
    SetFields();
  }
  HamPlugin(const HamPlugin& other)
      : op_(other.op_), policy_(other.policy_), name_(other.name_), dims_(other.dims_), float_(other.float_) {
    SetFields();
  }
  HamPlugin& operator=(const HamPlugin&) = delete;
  ~HamPlugin() override = default;

  // IPluginV3
  nv::IPluginCapability* getCapabilityInterface(nv::PluginCapabilityType type) noexcept override {
    switch (type) {
      case nv::PluginCapabilityType::kCORE:
        return static_cast<nv::IPluginV3OneCore*>(this);
      case nv::PluginCapabilityType::kBUILD:
        return static_cast<nv::IPluginV3OneBuildV2*>(this);  // V2: TensorRT asks getAliasedInput
      case nv::PluginCapabilityType::kRUNTIME:
        return static_cast<nv::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }
  nv::IPluginV3* clone() noexcept override {
    try {
      return new HamPlugin(*this);
    } catch (const std::exception& e) {
      Log(Severity::kERROR, name_ + ": clone failed: " + e.what());
      return nullptr;
    }
  }

  // IPluginV3OneCore
  const char* getPluginName() const noexcept override { return name_.c_str(); }
  const char* getPluginVersion() const noexcept override { return trt_rules::kVersion; }
  const char* getPluginNamespace() const noexcept override { return trt_rules::kNamespace; }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return op_->num_outputs; }

  int32_t configurePlugin(const nv::DynamicPluginTensorDesc* /*in*/, int32_t nbInputs,
                          const nv::DynamicPluginTensorDesc* /*out*/, int32_t nbOutputs) noexcept override {
    return CheckCounts(nbInputs, nbOutputs) ? 0 : -1;
  }

  int32_t getOutputDataTypes(nv::DataType* outputTypes, int32_t nbOutputs, const nv::DataType* inputTypes,
                             int32_t nbInputs) const noexcept override {
    if (!CheckCounts(nbInputs, nbOutputs)) return -1;
    const nv::DataType t = inputTypes[trt_rules::FirstFloatInput(*op_)];
    for (int32_t o = 0; o < nbOutputs; ++o) {
      switch (trt_rules::Kind(op_->outputs[o])) {
        case trt_rules::PluginKind::kFloat:
          outputTypes[o] = t;
          break;
        case trt_rules::PluginKind::kInt64:
          outputTypes[o] = nv::DataType::kINT64;
          break;
        case trt_rules::PluginKind::kInt32:
          outputTypes[o] = nv::DataType::kINT32;
          break;
      }
    }
    return 0;
  }

  int32_t getOutputShapes(const nv::DimsExprs* inputs, int32_t nbInputs, const nv::DimsExprs* /*shapeInputs*/,
                          int32_t nbShapeInputs, nv::DimsExprs* outputs, int32_t nbOutputs,
                          nv::IExprBuilder& /*exprBuilder*/) noexcept override {
    if (!CheckCounts(nbInputs, nbOutputs) || nbShapeInputs != 0) return -1;
    for (int32_t o = 0; o < nbOutputs; ++o) {
      const char* letters = op_->outputs[o].letters;
      const int32_t rank = static_cast<int32_t>(std::strlen(letters));
      outputs[o].nbDims = rank;
      for (int32_t d = 0; d < rank; ++d) {
        const trt_rules::Source source = trt_rules::LetterSource(*op_, letters[d]);
        if (source.input < 0 || inputs[source.input].nbDims <= source.dim) {
          Log(Severity::kERROR, name_ + ": input " + std::to_string(source.input) + " has the wrong rank");
          return -1;
        }
        outputs[o].d[d] = inputs[source.input].d[source.dim];
      }
    }
    return 0;
  }

  // Linear layouts; T is float32 or float16 (the CUDA kernels' types) and one for every float I/O; int64 for the
  // lengths; int32 for the routed masks.
  bool supportsFormatCombination(int32_t pos, const nv::DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override {
    if (!CheckCounts(nbInputs, nbOutputs) || pos < 0 || pos >= nbInputs + nbOutputs) return false;
    const nv::PluginTensorDesc& desc = inOut[pos].desc;
    if (desc.format != nv::TensorFormat::kLINEAR) return false;
    const spec::Arg& arg = pos < nbInputs ? op_->inputs[pos] : op_->outputs[pos - nbInputs];
    switch (trt_rules::Kind(arg)) {
      case trt_rules::PluginKind::kFloat: {
        const int32_t first = trt_rules::FirstFloatInput(*op_);
        return pos == first ? IsKernelFloat(desc.type) : desc.type == inOut[first].desc.type;
      }
      case trt_rules::PluginKind::kInt64:
        return desc.type == nv::DataType::kINT64;
      case trt_rules::PluginKind::kInt32:
        return desc.type == nv::DataType::kINT32;
    }
    return false;
  }

  int32_t getAliasedInput(int32_t outputIndex) noexcept override { return trt_rules::AliasedInput(*op_, outputIndex); }

  // IPluginV3OneRuntime
  int32_t onShapeChange(const nv::PluginTensorDesc* in, int32_t nbInputs, const nv::PluginTensorDesc* /*out*/,
                        int32_t nbOutputs) noexcept override {
    if (!CheckCounts(nbInputs, nbOutputs)) return -1;
    try {
      OpCheck check(*op_, name_, {"float32", "float16"});
      check.BoolAs("int32");
      for (int32_t i = 0; i < nbInputs; ++i) {
        check.Input(i, DTypeName(in[i].type), std::vector<int64_t>(in[i].dims.d, in[i].dims.d + in[i].dims.nbDims));
      }
      dims_ = {check['B'], check['H'], check['T'], check['C'], check['K'], check['V']};
      float_ = in[trt_rules::FirstFloatInput(*op_)].type;
      return 0;
    } catch (const std::exception& e) {
      Log(Severity::kERROR, e.what());
      return -1;
    }
  }

  int32_t enqueue(const nv::PluginTensorDesc* /*inputDesc*/, const nv::PluginTensorDesc* /*outputDesc*/,
                  const void* const* inputs, void* const* outputs, void* /*workspace*/,
                  cudaStream_t stream) noexcept override {
    const cuda::DType dtype = float_ == nv::DataType::kFLOAT ? cuda::DType::kFloat32 : cuda::DType::kFloat16;
    const char* error = nullptr;
    if (op_ == &spec::kCacheAttention) {
      namespace in = spec::cache_attention;
      const CacheAttentionDims d{dims_.B, dims_.H, dims_.T, dims_.C, dims_.K, dims_.V};
      error = cuda::CacheAttention(dtype, d, inputs[in::kQ], inputs[in::kKCache], inputs[in::kVCache],
                                   static_cast<const int64_t*>(inputs[in::kLength]), inputs[in::kK], inputs[in::kV],
                                   static_cast<const int32_t*>(inputs[in::kRouted]), inputs[in::kScale],
                                   outputs[in::kO], stream);
    } else if (op_ == &spec::kCacheAppend) {
      namespace in = spec::cache_append;
      const CacheAppendDims d{dims_.B, dims_.H, dims_.T, dims_.C, dims_.K, dims_.V};
      const Policy policy = policy_ == in::kEvict ? Policy::kEvict : Policy::kDrop;
      // The caches are aliased: TensorRT binds each output to its input's buffer, so nothing is copied; were they
      // apart, the launcher copies the inputs first.
      error = cuda::CacheAppend(dtype, d, policy, inputs[in::kKCache], inputs[in::kVCache], inputs[in::kScoreCache],
                                static_cast<const int64_t*>(inputs[in::kLength]), inputs[in::kK], inputs[in::kV],
                                inputs[in::kScore], static_cast<const int32_t*>(inputs[in::kRouted]),
                                outputs[in::kKCacheOut], outputs[in::kVCacheOut], outputs[in::kScoreCacheOut],
                                static_cast<int64_t*>(outputs[in::kLengthOut]),
                                static_cast<int64_t*>(outputs[in::kOverflow]), stream);
    } else if (op_ == &spec::kGdnPrefill) {
      namespace in = spec::gdn_prefill;
      const GdnDims d{dims_.B, dims_.T, dims_.H, dims_.K, dims_.V};
      error =
          cuda::GdnPrefill(dtype, d, inputs[in::kQ], inputs[in::kK], inputs[in::kV], inputs[in::kG], inputs[in::kBeta],
                           inputs[in::kState], outputs[in::kO], outputs[in::kVhat], outputs[in::kStateOut], stream);
    } else {
      error = "unknown op";
    }
    if (error != nullptr) {
      Log(Severity::kERROR, name_ + ": " + error);
      return -1;
    }
    return 0;
  }

  nv::IPluginV3* attachToContext(nv::IPluginResourceContext* /*context*/) noexcept override { return clone(); }

  const nv::PluginFieldCollection* getFieldsToSerialize() noexcept override { return &collection_; }

 private:
  struct Dims {
    int64_t B = 0, H = 0, T = 0, C = 0, K = 0, V = 0;
  };

  bool CheckCounts(int32_t nbInputs, int32_t nbOutputs) const {
    if (nbInputs == op_->num_inputs && nbOutputs == op_->num_outputs) return true;
    Log(Severity::kERROR, name_ + ": takes " + std::to_string(op_->num_inputs) + " inputs and gives " +
                              std::to_string(op_->num_outputs) + " outputs, got " + std::to_string(nbInputs) + " and " +
                              std::to_string(nbOutputs));
    return false;
  }

  // The attributes, as the creator reads them back at deserialization.
  void SetFields() {
    fields_.clear();
    for (int a = 0; a < op_->num_attributes; ++a) {
      const char* value = op_->attributes[a].choices[policy_];
      fields_.emplace_back(op_->attributes[a].name, value, nv::PluginFieldType::kCHAR,
                           static_cast<int32_t>(std::strlen(value)));
    }
    collection_.nbFields = static_cast<int32_t>(fields_.size());
    collection_.fields = fields_.data();
  }

  const spec::Op* op_;
  int policy_;
  std::string name_;
  Dims dims_;
  nv::DataType float_ = nv::DataType::kFLOAT;
  std::vector<nv::PluginField> fields_;
  nv::PluginFieldCollection collection_{};
};

// --- the creators ----------------------------------------------------------------------------------------------------
class HamCreator final : public nv::IPluginCreatorV3One {
 public:
  explicit HamCreator(const spec::Op& op) : op_(&op), name_(trt_rules::PluginName(op)) {
    for (int a = 0; a < op.num_attributes; ++a) {
      names_.emplace_back(op.attributes[a].name, nullptr, nv::PluginFieldType::kCHAR, 0);
    }
    collection_.nbFields = static_cast<int32_t>(names_.size());
    collection_.fields = names_.data();
  }

  // The attribute must be present (the ONNX parser passes the node's attributes; a deserialized engine, the fields
  // getFieldsToSerialize wrote) and one of its choices; otherwise the plugin is refused with a logged reason.
  nv::IPluginV3* createPlugin(const char* /*name*/, const nv::PluginFieldCollection* fc,
                              nv::TensorRTPhase /*phase*/) noexcept override {
    try {
      OpCheck check(*op_, name_, {"float32", "float16"});
      int policy = 0;
      for (int a = 0; a < op_->num_attributes; ++a) {
        const char* value = nullptr;
        std::string text;
        for (int32_t f = 0; fc != nullptr && f < fc->nbFields; ++f) {
          if (fc->fields[f].name != nullptr && std::strcmp(fc->fields[f].name, op_->attributes[a].name) == 0) {
            text = FieldString(fc->fields[f]);
            value = text.c_str();
          }
        }
        policy = check.Attribute(a, value);
      }
      return new HamPlugin(*op_, policy);
    } catch (const std::exception& e) {
      Log(Severity::kERROR, e.what());
      return nullptr;
    }
  }

  const nv::PluginFieldCollection* getFieldNames() noexcept override { return &collection_; }
  const char* getPluginName() const noexcept override { return name_.c_str(); }
  const char* getPluginVersion() const noexcept override { return trt_rules::kVersion; }
  const char* getPluginNamespace() const noexcept override { return trt_rules::kNamespace; }

 private:
  const spec::Op* op_;
  std::string name_;
  std::vector<nv::PluginField> names_;
  nv::PluginFieldCollection collection_{};
};

}  // namespace
}  // namespace trt_plugins
}  // namespace ham

// The entry points IPluginRegistry::loadLibrary looks up (trtexec --dynamicPlugins), the only exported symbols
// (TENSORRTAPI exports nothing outside TensorRT's own build). No REGISTER_TENSORRT_PLUGIN: a library registered both
// ways would register its creators twice.
#define HAM_TRT_EXPORT __attribute__((visibility("default")))

extern "C" HAM_TRT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  std::lock_guard<std::mutex> lock(ham::trt_plugins::gLoggerMutex);
  ham::trt_plugins::gLoggerFinder = finder;
}

extern "C" HAM_TRT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  using ham::trt_plugins::HamCreator;
  static HamCreator attention(ham::spec::kCacheAttention);
  static HamCreator append(ham::spec::kCacheAppend);
  static HamCreator gdn(ham::spec::kGdnPrefill);
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&attention, &append, &gdn};
  nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
  return creators;
}
