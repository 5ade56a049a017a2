// ONNX Runtime custom-op library of the HAM ops: domain "ham.ai", version 1, CPU kernels for float32 and float16.
//
// The op names, versions, input and output order, attributes and input checks come from the op specs
// (../common/ham_op_spec.h, generated from ham_export/ops/spec.py; ../common/ham_op_check.h); the math is that of
// ham_export/ops/reference.py (kernels in ../common/ham_cpu_kernels.h, CUDA launchers in ham_cuda_kernels.h). Built
// against the ORT C++ headers with ORT_API_MANUAL_INIT: ONNX Runtime hands its API to RegisterCustomOps, so no link
// against libonnxruntime.
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
#include "ham_op_check.h"
#include "ham_op_spec.h"
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

constexpr const char* kCpu = "CPUExecutionProvider";

// Cache tensors CacheAppend copied from input to output (the caller did not share the buffers), and their bytes.
std::atomic<uint64_t> g_cache_copies{0};
std::atomic<uint64_t> g_cache_copy_bytes{0};

[[noreturn]] void Fail(const std::string& message) { throw Ort::Exception(std::string(message), ORT_INVALID_ARGUMENT); }

template <typename T>
constexpr const char* kFloatName = std::is_same_v<T, float> ? "float32" : "float16";

// The op's check from its spec, for this library's float types; Input() checks an input by its spec index.
class Check : public OpCheck {
 public:
  explicit Check(const spec::Op& op) : OpCheck(op, op.onnx_name, {"float32", "float16"}) {}

  template <typename T>
  void Input(int i, const Tensor<T>& t) {
    const char* dtype = std::is_same_v<T, int64_t> ? "int64" : std::is_same_v<T, bool> ? "bool" : kFloatName<T>;
    OpCheck::Input(i, dtype, t.Shape());
  }
};

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
  } catch (const CheckError& e) {
    return Ort::Status(e.what(), ORT_INVALID_ARGUMENT);
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
    namespace in = spec::cache_attention;
    return Guard(spec::kCacheAttention.onnx_name, [&] {
      Check check(spec::kCacheAttention);
      check.Input(in::kQ, q);
      check.Input(in::kKCache, k_cache);
      check.Input(in::kVCache, v_cache);
      check.Input(in::kLength, length);
      check.Input(in::kK, k);
      check.Input(in::kV, v);
      check.Input(in::kRouted, routed);
      check.Input(in::kScale, scale);
      const CacheAttentionDims d{check['B'], check['H'], check['T'], check['C'], check['K'], check['V']};
      // On the host the lengths are checked here; the CUDA kernels refuse a bad row on the device.
      if constexpr (!kCuda) check.Values(in::kLength, length.Data(), d.B);
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
  namespace in = spec::cache_append;
  std::string policy;
  bool present = true;
  try {
    policy = Ort::ConstKernelInfo(info).GetAttribute<std::string>(in::kAttributes[0].name);
  } catch (const Ort::Exception&) {
    present = false;
  }
  try {
    const int choice = Check(spec::kCacheAppend).Attribute(0, present ? policy.c_str() : nullptr);
    return choice == in::kDrop ? Policy::kDrop : Policy::kEvict;
  } catch (const CheckError& e) {
    Fail(e.what());
  }
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
    namespace in = spec::cache_append;
    return Guard(spec::kCacheAppend.onnx_name, [&] {
      Check check(spec::kCacheAppend);
      check.Input(in::kKCache, k_cache);
      check.Input(in::kVCache, v_cache);
      check.Input(in::kScoreCache, score_cache);
      check.Input(in::kLength, length);
      check.Input(in::kK, k);
      check.Input(in::kV, v);
      check.Input(in::kScore, score);
      check.Input(in::kRouted, routed);
      const CacheAppendDims d{check['B'], check['H'], check['T'], check['C'], check['K'], check['V']};
      // On the host the lengths are checked here; the CUDA kernels refuse a bad row on the device.
      if constexpr (!kCuda) check.Values(in::kLength, length.Data(), d.B);
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
    namespace in = spec::gdn_prefill;
    return Guard(spec::kGdnPrefill.onnx_name, [&] {
      Check check(spec::kGdnPrefill);
      check.Input(in::kQ, q);
      check.Input(in::kK, k);
      check.Input(in::kV, v);
      check.Input(in::kG, g);
      check.Input(in::kBeta, beta);
      check.Input(in::kState, state);
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
template <template <typename, bool> class Kernel, bool kCuda>
void AddOp(std::vector<OrtCustomOp*>& list, const spec::Op& op, const char* provider) {
  using Ort::Custom::CreateLiteCustomOp;
  list.push_back(CreateLiteCustomOp<Kernel<float, kCuda>>(op.onnx_name, provider, op.version, op.version));
  list.push_back(CreateLiteCustomOp<Kernel<Ort::Float16_t, kCuda>>(op.onnx_name, provider, op.version, op.version));
}

template <bool kCuda>
void AddOps(std::vector<OrtCustomOp*>& list, const char* provider) {
  AddOp<CacheAttentionOp, kCuda>(list, spec::kCacheAttention, provider);
  AddOp<CacheAppendOp, kCuda>(list, spec::kCacheAppend, provider);
  AddOp<GdnPrefillOp, kCuda>(list, spec::kGdnPrefill, provider);
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
    Ort::CustomOpDomain domain{ham::spec::kOnnxDomain};
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
