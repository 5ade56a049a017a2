// ONNX Runtime custom-op library of the HAM ops: domain "ham.ai", version 1, CPU kernels for float32 and float16.
//
// The op names, input and output order and attributes follow ham_export/opspec.py; the math is that of
// ham_export/reference.py (kernels in ham_cpu_kernels.h). Built against the ORT C++ headers with
// ORT_API_MANUAL_INIT: ONNX Runtime hands its API to RegisterCustomOps, so no link against libonnxruntime.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#include "onnxruntime_lite_custom_op.h"
#undef ORT_API_MANUAL_INIT

#include <atomic>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ham_cpu_kernels.h"
#ifdef HAM_ORT_CUDA
#include "ham_cuda_kernels.h"
#endif

#define HAM_EXPORT extern "C" __attribute__((visibility("default")))

namespace ham {

template <>
struct Element<Ort::Float16_t> {
  static float Load(Ort::Float16_t x) { return x.ToFloat(); }
  static Ort::Float16_t Store(float x) { return Ort::Float16_t(x); }
};

namespace {

using Ort::Custom::Tensor;

constexpr const char* kDomain = "ham.ai";
constexpr int kVersion = 1;
constexpr const char* kCpu = "CPUExecutionProvider";

// Cache tensors CacheAppend copied from input to output (the caller did not share the buffers), and their bytes.
std::atomic<uint64_t> g_cache_copies{0};
std::atomic<uint64_t> g_cache_copy_bytes{0};

[[noreturn]] void Fail(const std::string& message) { throw Ort::Exception(std::string(message), ORT_INVALID_ARGUMENT); }

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

// Checks each tensor's shape against the letters of its spec (e.g. "BHTK" for [B, H, T, K]) and binds each
// letter to a size at its first sight; a later mismatch names both tensors.
class ShapeCheck {
 public:
  explicit ShapeCheck(const char* op) : op_(op) {}

  void operator()(const char* kind, const char* name, const std::vector<int64_t>& shape, const std::string& letters) {
    if (shape.size() != letters.size()) {
      Fail(Where(kind, name) + " has shape " + ShapeString(shape) + " (rank " + std::to_string(shape.size()) +
           "), expected rank " + std::to_string(letters.size()) + ": " + Letters(letters));
    }
    for (size_t i = 0; i < letters.size(); ++i) {
      Dim& dim = dims_[Index(letters[i])];
      if (dim.from.empty()) {
        dim.size = shape[i];
        dim.from = name;
      } else if (dim.size != shape[i]) {
        Fail(Where(kind, name) + " has shape " + ShapeString(shape) + ", expected " + Letters(letters) + " with " +
             letters[i] + " = " + std::to_string(dim.size) + " (from input '" + dim.from + "')");
      }
    }
  }
  template <typename T>
  void Input(const char* name, const Tensor<T>& t, const std::string& letters) {
    (*this)("input", name, t.Shape(), letters);
  }

  int64_t operator[](char letter) const { return dims_[Index(letter)].size; }
  const std::string& op() const { return op_; }

 private:
  struct Dim {
    int64_t size = 0;
    std::string from;
  };
  static size_t Index(char letter) { return static_cast<unsigned char>(letter) % 32; }
  static std::string Letters(const std::string& letters) {
    std::string out = "[";
    for (size_t i = 0; i < letters.size(); ++i) (out += (i ? ", " : "")) += letters[i];
    return out + "]";
  }
  std::string Where(const char* kind, const char* name) const { return op_ + ": " + kind + " '" + name + "'"; }

  std::string op_;
  Dim dims_[32];
};

void CheckLength(const ShapeCheck& check, const int64_t* length, int64_t batch, int64_t capacity) {
  for (int64_t b = 0; b < batch; ++b) {
    if (length[b] < 0 || length[b] > capacity) {
      Fail(check.op() + ": input 'length' holds " + std::to_string(length[b]) + " at batch " + std::to_string(b) +
           ", outside [0, C] with cache capacity C = " + std::to_string(capacity));
    }
  }
}

// Runs fn(i) for i in [0, total) on ORT's intra-op threads; the first exception is rethrown here.
template <typename Fn>
void ParallelFor(OrtKernelContext* ctx, int64_t total, Fn&& fn) {
  if (total <= 0) return;
  struct Job {
    Fn* fn;
    std::mutex mutex;
    std::exception_ptr error;
  } job{&fn, {}, nullptr};
  auto run = [](void* data, size_t i) {
    auto* j = static_cast<Job*>(data);
    try {
      (*j->fn)(static_cast<int64_t>(i));
    } catch (...) {
      std::lock_guard<std::mutex> lock(j->mutex);
      if (!j->error) j->error = std::current_exception();
    }
  };
  if (total == 1) {
    run(&job, 0);
  } else {
    Ort::KernelContext(ctx).ParallelFor(run, static_cast<size_t>(total), 0, &job);
  }
  if (job.error) std::rethrow_exception(job.error);
}

// Turns any exception of a kernel into an ORT status, so that nothing unwinds through ONNX Runtime's C ABI.
template <typename Fn>
Ort::Status Guard(const char* op, Fn&& fn) {
  try {
    fn();
    return Ort::Status{nullptr};
  } catch (const Ort::Exception& e) {
    return Ort::Status(e);
  } catch (const std::exception& e) {
    return Ort::Status((std::string(op) + ": " + e.what()).c_str(), ORT_RUNTIME_EXCEPTION);
  } catch (...) {
    return Ort::Status((std::string(op) + ": unknown error").c_str(), ORT_RUNTIME_EXCEPTION);
  }
}

#ifdef HAM_ORT_CUDA
template <typename T>
constexpr cuda::DType kCudaType = std::is_same_v<T, float> ? cuda::DType::kFloat32 : cuda::DType::kFloat16;

void CheckCuda(const char* op, const char* error) {
  if (error) throw Ort::Exception(std::string(op) + " (CUDA): " + error, ORT_RUNTIME_EXCEPTION);
}
#endif

// Each op is a struct for the lite API, for one storage type T and one device (CPU, or CUDA with kCuda).

// ---------------------------------------------------------------------------------------------------------------
template <typename T, bool kCuda>
struct CacheAttentionOp {
  CacheAttentionOp(const OrtApi*, const OrtKernelInfo*) {}

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<T>& q, const Tensor<T>& k_cache, const Tensor<T>& v_cache,
                      const Tensor<int64_t>& length, const Tensor<T>& k, const Tensor<T>& v, const Tensor<bool>& routed,
                      const Tensor<T>& scale, Tensor<T>& o) {
    return Guard("CacheAttention", [&] {
      ShapeCheck check("CacheAttention");
      check.Input("q", q, "BHTK");
      check.Input("k_cache", k_cache, "BHCK");
      check.Input("v_cache", v_cache, "BHCV");
      check.Input("length", length, "B");
      check.Input("k", k, "BHTK");
      check.Input("v", v, "BHTV");
      check.Input("routed", routed, "BT");
      check.Input("scale", scale, "H");
      const CacheAttentionDims d{check['B'], check['H'], check['T'], check['C'], check['K'], check['V']};
      if constexpr (!kCuda) CheckLength(check, length.Data(), d.B, d.C);
      T* out = o.Allocate({d.B, d.H, d.T, d.V});
      if (d.B * d.H * d.T * d.V == 0) return;
      const T *qp = q.Data(), *kcp = k_cache.Data(), *vcp = v_cache.Data(), *kp = k.Data(), *vp = v.Data();
      const T* sp = scale.Data();
      const int64_t* lp = length.Data();
      const bool* rp = routed.Data();
      if constexpr (kCuda) {
#ifdef HAM_ORT_CUDA
        CheckCuda("CacheAttention", cuda::CacheAttention(kCudaType<T>, d, qp, kcp, vcp, lp, kp, vp, rp, sp, out,
                                                         Ort::KernelContext(ctx).GetGPUComputeStream()));
#endif
      } else {
        ParallelFor(ctx, d.B * d.H, [&](int64_t i) {
          std::vector<float> scratch(CacheAttentionScratch(d));
          CacheAttentionHead(d, i / d.H, i % d.H, qp, kcp, vcp, lp, kp, vp, rp, sp, out, scratch.data());
        });
      }
    });
  }
};

// ---------------------------------------------------------------------------------------------------------------
Policy ReadPolicy(const OrtKernelInfo* info) {
  std::string policy;
  try {
    policy = Ort::ConstKernelInfo(info).GetAttribute<std::string>("policy");
  } catch (const Ort::Exception&) {
    Fail("CacheAppend: attribute 'policy' is missing; it must be \"drop\" or \"evict\"");
  }
  if (policy == "drop") return Policy::kDrop;
  if (policy == "evict") return Policy::kEvict;
  Fail("CacheAppend: attribute 'policy' is \"" + policy + "\"; it must be \"drop\" or \"evict\"");
}

void CountCopy(uint64_t bytes) {
  g_cache_copies.fetch_add(1, std::memory_order_relaxed);
  g_cache_copy_bytes.fetch_add(bytes, std::memory_order_relaxed);
}

// Makes out hold the contents of in: nothing to do when the caller bound the same buffer to both (decode with a
// shared cache buffer), a copy otherwise.
template <typename T>
void CopyUnlessShared(const T* in, T* out, int64_t count) {
  if (in == out || count == 0) return;
  std::memmove(out, in, sizeof(T) * static_cast<size_t>(count));
  CountCopy(sizeof(T) * static_cast<uint64_t>(count));
}

template <typename T, bool kCuda>
struct CacheAppendOp {
  CacheAppendOp(const OrtApi*, const OrtKernelInfo* info) : policy_(ReadPolicy(info)) {}

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<T>& k_cache, const Tensor<T>& v_cache,
                      const Tensor<T>& score_cache, const Tensor<int64_t>& length, const Tensor<T>& k,
                      const Tensor<T>& v, const Tensor<T>& score, const Tensor<bool>& routed, Tensor<T>& k_cache_out,
                      Tensor<T>& v_cache_out, Tensor<T>& score_cache_out, Tensor<int64_t>& length_out,
                      Tensor<int64_t>& overflow) {
    return Guard("CacheAppend", [&] {
      ShapeCheck check("CacheAppend");
      check.Input("k_cache", k_cache, "BHCK");
      check.Input("v_cache", v_cache, "BHCV");
      check.Input("score_cache", score_cache, "BC");
      check.Input("length", length, "B");
      check.Input("k", k, "BHTK");
      check.Input("v", v, "BHTV");
      check.Input("score", score, "BT");
      check.Input("routed", routed, "BT");
      const CacheAppendDims d{check['B'], check['H'], check['T'], check['C'], check['K'], check['V']};
      if constexpr (!kCuda) CheckLength(check, length.Data(), d.B, d.C);
      T* kc = k_cache_out.Allocate(k_cache.Shape());
      T* vc = v_cache_out.Allocate(v_cache.Shape());
      T* sc = score_cache_out.Allocate(score_cache.Shape());
      int64_t* len_out = length_out.Allocate({d.B});
      int64_t* over = overflow.Allocate({d.B});
      const T *kp = k.Data(), *vp = v.Data(), *sp = score.Data();
      const int64_t* lp = length.Data();
      const bool* rp = routed.Data();
      if constexpr (kCuda) {
#ifdef HAM_ORT_CUDA
        // The launcher copies each cache that is not shared (on the stream); the count is kept here.
        if (k_cache.Data() != kc && k_cache.NumberOfElement()) CountCopy(k_cache.SizeInBytes());
        if (v_cache.Data() != vc && v_cache.NumberOfElement()) CountCopy(v_cache.SizeInBytes());
        if (score_cache.Data() != sc && score_cache.NumberOfElement()) CountCopy(score_cache.SizeInBytes());
        CheckCuda("CacheAppend", cuda::CacheAppend(kCudaType<T>, d, policy_, k_cache.Data(), v_cache.Data(),
                                                   score_cache.Data(), lp, kp, vp, sp, rp, kc, vc, sc, len_out, over,
                                                   Ort::KernelContext(ctx).GetGPUComputeStream()));
#endif
      } else {
        CopyUnlessShared(k_cache.Data(), kc, k_cache.NumberOfElement());
        CopyUnlessShared(v_cache.Data(), vc, v_cache.NumberOfElement());
        CopyUnlessShared(score_cache.Data(), sc, score_cache.NumberOfElement());
        for (int64_t b = 0; b < d.B; ++b) CacheAppendRow(d, policy_, b, lp, kp, vp, sp, rp, kc, vc, sc, len_out, over);
        (void)ctx;
      }
    });
  }

  Policy policy_;
};

// ---------------------------------------------------------------------------------------------------------------
template <typename T, bool kCuda>
struct GdnPrefillOp {
  GdnPrefillOp(const OrtApi*, const OrtKernelInfo*) {}

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor<T>& q, const Tensor<T>& k, const Tensor<T>& v,
                      const Tensor<T>& g, const Tensor<T>& beta, const Tensor<T>& state, Tensor<T>& o, Tensor<T>& vhat,
                      Tensor<T>& state_out) {
    return Guard("GdnPrefill", [&] {
      ShapeCheck check("GdnPrefill");
      check.Input("q", q, "BTHK");
      check.Input("k", k, "BTHK");
      check.Input("v", v, "BTHV");
      check.Input("g", g, "BTH");
      check.Input("beta", beta, "BTH");
      check.Input("state", state, "BHKV");
      const GdnDims d{check['B'], check['T'], check['H'], check['K'], check['V']};
      T* op = o.Allocate({d.B, d.T, d.H, d.V});
      T* vh = vhat.Allocate({d.B, d.T, d.H, d.V});
      T* so = state_out.Allocate({d.B, d.H, d.K, d.V});
      const T *qp = q.Data(), *kp = k.Data(), *vp = v.Data(), *gp = g.Data(), *bp = beta.Data(), *sp = state.Data();
      if constexpr (kCuda) {
#ifdef HAM_ORT_CUDA
        CheckCuda("GdnPrefill", cuda::GdnPrefill(kCudaType<T>, d, qp, kp, vp, gp, bp, sp, op, vh, so,
                                                 Ort::KernelContext(ctx).GetGPUComputeStream()));
#endif
      } else {
        ParallelFor(ctx, d.B * d.H, [&](int64_t i) {
          std::vector<float> scratch(GdnPrefillScratch(d));
          GdnPrefillHead(d, i / d.H, i % d.H, qp, kp, vp, gp, bp, sp, op, vh, so, scratch.data());
        });
      }
    });
  }
};

// ---------------------------------------------------------------------------------------------------------------
template <bool kCuda>
void AddOps(std::vector<OrtCustomOp*>& list, const char* provider) {
  using Ort::Custom::CreateLiteCustomOp;
  using Half = Ort::Float16_t;
  list.push_back(CreateLiteCustomOp<CacheAttentionOp<float, kCuda>>("CacheAttention", provider, kVersion, kVersion));
  list.push_back(CreateLiteCustomOp<CacheAttentionOp<Half, kCuda>>("CacheAttention", provider, kVersion, kVersion));
  list.push_back(CreateLiteCustomOp<CacheAppendOp<float, kCuda>>("CacheAppend", provider, kVersion, kVersion));
  list.push_back(CreateLiteCustomOp<CacheAppendOp<Half, kCuda>>("CacheAppend", provider, kVersion, kVersion));
  list.push_back(CreateLiteCustomOp<GdnPrefillOp<float, kCuda>>("GdnPrefill", provider, kVersion, kVersion));
  list.push_back(CreateLiteCustomOp<GdnPrefillOp<Half, kCuda>>("GdnPrefill", provider, kVersion, kVersion));
}

// The ops live as long as the process: sessions hold pointers to them.
const std::vector<OrtCustomOp*>& Ops() {
  static const std::vector<OrtCustomOp*>* ops = [] {
    auto* list = new std::vector<OrtCustomOp*>;
    AddOps<false>(*list, kCpu);
#ifdef HAM_ORT_CUDA
    AddOps<true>(*list, "CUDAExecutionProvider");
#endif
    return list;
  }();
  return *ops;
}

}  // namespace
}  // namespace ham

// Called by ONNX Runtime (SessionOptions.register_custom_ops_library): adds the ham.ai domain to the options.
HAM_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    const std::string message =
        "libham_ort_ops needs ONNX Runtime with C API version >= " + std::to_string(ORT_API_VERSION) +
        "; this runtime is " + api_base->GetVersionString();
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  Ort::InitApi(api);
  try {
    // Each session options object gets its own domain; ONNX Runtime keeps pointers to it, so it is never freed.
    Ort::CustomOpDomain domain{ham::kDomain};
    for (OrtCustomOp* op : ham::Ops()) domain.Add(op);
    Ort::UnownedSessionOptions(options).Add(domain);
    domain.release();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}

// Diagnostics: how many cache tensors CacheAppend copied from input to output since the library was loaded (or
// the last reset), and their bytes. A decode step whose caller shares the cache buffers copies none.
HAM_EXPORT void HamOrtOpsCopyStats(uint64_t* copies, uint64_t* bytes) {
  if (copies) *copies = ham::g_cache_copies.load();
  if (bytes) *bytes = ham::g_cache_copy_bytes.load();
}

HAM_EXPORT void HamOrtOpsResetCopyStats() {
  ham::g_cache_copies.store(0);
  ham::g_cache_copy_bytes.store(0);
}

// 1 when the library holds the CUDA kernels (built with -DHAM_ORT_CUDA=ON), else 0.
HAM_EXPORT int HamOrtOpsCudaEnabled() {
#ifdef HAM_ORT_CUDA
  return 1;
#else
  return 0;
#endif
}
