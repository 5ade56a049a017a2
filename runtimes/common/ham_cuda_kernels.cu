// CUDA kernels of the HAM ops (see ham_cuda_kernels.h). Compiled for sm_90 by default; built only with
// -DHAM_ORT_CUDA=ON. Arithmetic is in float for both storage types.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "ham_cuda_kernels.h"
#include "ham_op_spec.h"

namespace ham {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarp = 32;

__device__ __forceinline__ float Load(float x) { return x; }
__device__ __forceinline__ float Load(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T Store(float x);
template <>
__device__ __forceinline__ float Store<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half Store<__half>(float x) {
  return __float2half(x);
}

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};

// Reduces v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <typename Op>
__device__ float BlockReduce(float v, Op op, float* scratch) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < warps; ++w) v = op(v, scratch[w]);
  return v;
}

// A length outside [0, C] is refused on the device (ham_op_spec.h, kInvalidLength): the row reads and writes
// nothing of its cache; its attention output is NaN, its overflow kInvalidLength, its length unchanged.
__device__ __forceinline__ bool ValidLength(int64_t length, int64_t capacity) {
  return length >= 0 && length <= capacity;
}

// ---------------------------------------------------------------------------------------------------------------
// CacheAttention: one block per (t, h, b); keys in chunks of kThreads with an online softmax.
// Shared memory: q [K], acc [V], weights [kThreads], reduction scratch [kThreads / 32].
// M: the routed mask's element type, bool (ONNX Runtime) or int32_t (TensorRT, whose plugins take no bool).
template <typename T, typename M>
__global__ void CacheAttentionKernel(CacheAttentionDims d, const T* q, const T* k_cache, const T* v_cache,
                                     const int64_t* length, const T* k, const T* v, const M* routed, const T* scale,
                                     T* o) {
  extern __shared__ float shared[];
  const int64_t t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t bh = b * d.H + h;
  float* sq = shared;
  float* acc = sq + d.K;
  float* weight = acc + d.V;
  float* scratch = weight + kThreads;

  if (!ValidLength(length[b], d.C)) {
    T* refused = o + (bh * d.T + t) * d.V;
    for (int64_t e = threadIdx.x; e < d.V; e += blockDim.x) refused[e] = Store<T>(NAN);
    return;
  }
  const int64_t len = length[b];
  const float s = Load(scale[h]);
  const T* qt = q + (bh * d.T + t) * d.K;
  for (int64_t i = threadIdx.x; i < d.K; i += blockDim.x) sq[i] = Load(qt[i]);
  for (int64_t e = threadIdx.x; e < d.V; e += blockDim.x) acc[e] = 0.0f;
  __syncthreads();

  const T* kc = k_cache + bh * d.C * d.K;
  const T* vc = v_cache + bh * d.C * d.V;
  const T* kn = k + bh * d.T * d.K;
  const T* vn = v + bh * d.T * d.V;
  const int64_t candidates = len + t + 1;  // cache entries [0, len), then new tokens [0, t]
  float top = -INFINITY, total = 0.0f;
  for (int64_t base = 0; base < candidates; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    float logit = -INFINITY;
    bool valid = false;
    if (j < candidates) {
      const T* key = nullptr;
      if (j < len) {
        key = kc + j * d.K;
        valid = true;
      } else {
        valid = routed[b * d.T + (j - len)] != 0;
        key = kn + (j - len) * d.K;
      }
      if (valid) {
        float dot = 0.0f;
        for (int64_t i = 0; i < d.K; ++i) dot += sq[i] * Load(key[i]);
        logit = s * dot;
      }
    }
    const float chunk_top = BlockReduce(valid ? logit : -INFINITY, MaxOp(), scratch);
    const float new_top = fmaxf(top, chunk_top);
    if (new_top == -INFINITY) continue;  // no key yet (uniform across the block)
    const float w = valid ? __expf(logit - new_top) : 0.0f;
    weight[threadIdx.x] = w;
    const float chunk_total = BlockReduce(w, SumOp(), scratch);  // synchronizes, so weight[] is complete
    const float correction = __expf(top - new_top);
    total = total * correction + chunk_total;
    const int64_t count = min(static_cast<int64_t>(blockDim.x), candidates - base);
    for (int64_t e = threadIdx.x; e < d.V; e += blockDim.x) {
      float a = acc[e] * correction;
      for (int64_t jj = 0; jj < count; ++jj) {
        const float wj = weight[jj];
        if (wj == 0.0f) continue;
        const int64_t idx = base + jj;
        const T* row = idx < len ? vc + idx * d.V : vn + (idx - len) * d.V;
        a += wj * Load(row[e]);
      }
      acc[e] = a;
    }
    top = new_top;
    __syncthreads();
  }
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;  // no key: acc is 0 and so is the output
  T* ot = o + (bh * d.T + t) * d.V;
  for (int64_t e = threadIdx.x; e < d.V; e += blockDim.x) ot[e] = Store<T>(acc[e] * inv);
}

// ---------------------------------------------------------------------------------------------------------------
// CacheAppend: one block per batch row; tokens in order, every thread follows the same (uniform) decisions.
// Eviction compares score keys: the score rounded to the grid 1 / spec::kEvictGrid (exact; NaN stays NaN).
__device__ __forceinline__ float EvictKey(float score) { return floorf(score * spec::kEvictGrid + 0.5f); }

struct Lowest {
  float score;  // the key
  int64_t slot;
  bool nan;
};

__device__ __forceinline__ bool Lower(const Lowest& a, const Lowest& b) {
  if (a.slot < 0) return false;
  if (b.slot < 0) return true;
  if (a.nan != b.nan) return a.nan;  // a NaN score is the lowest, as torch.argmin has it
  if (!a.nan && a.score != b.score) return a.score < b.score;
  return a.slot < b.slot;  // ties: the first slot
}

template <typename T, typename M>
__global__ void CacheAppendKernel(CacheAppendDims d, Policy policy, const int64_t* length, const T* k, const T* v,
                                  const T* score, const M* routed, T* k_out, T* v_out, T* s_out, int64_t* length_out,
                                  int64_t* overflow) {
  __shared__ Lowest lowest[kThreads];
  const int64_t b = blockIdx.x;
  T* sb = s_out + b * d.C;
  if (!ValidLength(length[b], d.C)) {
    if (threadIdx.x == 0) {
      length_out[b] = length[b];
      overflow[b] = spec::kInvalidLength;
    }
    return;
  }
  int64_t len = length[b];
  int64_t over = 0;
  for (int64_t t = 0; t < d.T; ++t) {
    if (routed[b * d.T + t] == 0) continue;
    int64_t slot = -1;
    if (len < d.C) {
      slot = len++;
    } else {
      ++over;
      if (policy == Policy::kEvict && d.C > 0) {
        Lowest mine{0.0f, -1, false};
        for (int64_t c = threadIdx.x; c < d.C; c += blockDim.x) {
          const float sc = EvictKey(Load(sb[c]));
          const Lowest here{sc, c, isnan(sc)};
          if (Lower(here, mine)) mine = here;
        }
        lowest[threadIdx.x] = mine;
        __syncthreads();
        for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
          if (threadIdx.x < stride && Lower(lowest[threadIdx.x + stride], lowest[threadIdx.x])) {
            lowest[threadIdx.x] = lowest[threadIdx.x + stride];
          }
          __syncthreads();
        }
        const Lowest low = lowest[0];
        __syncthreads();
        if (EvictKey(Load(score[b * d.T + t])) > low.score && !low.nan) slot = low.slot;
      }
    }
    if (slot < 0) continue;
    for (int64_t idx = threadIdx.x; idx < d.H * d.K; idx += blockDim.x) {
      const int64_t h = idx / d.K, i = idx % d.K;
      k_out[((b * d.H + h) * d.C + slot) * d.K + i] = k[((b * d.H + h) * d.T + t) * d.K + i];
    }
    for (int64_t idx = threadIdx.x; idx < d.H * d.V; idx += blockDim.x) {
      const int64_t h = idx / d.V, e = idx % d.V;
      v_out[((b * d.H + h) * d.C + slot) * d.V + e] = v[((b * d.H + h) * d.T + t) * d.V + e];
    }
    if (threadIdx.x == 0) sb[slot] = score[b * d.T + t];
    __syncthreads();  // the next eviction sees this score
  }
  if (threadIdx.x == 0) {
    length_out[b] = len;
    overflow[b] = over;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// GdnPrefill: one block per (b, h); each thread owns one column e of the state (the delta rule keeps columns
// apart), held in shared memory as S[i * blockDim + thread]. Shared memory: S [K, blockDim], k [K], q [K].
template <typename T>
__global__ void GdnPrefillKernel(GdnDims d, const T* q, const T* k, const T* v, const T* g, const T* beta,
                                 const T* state, T* o, T* vhat, T* state_out) {
  extern __shared__ float shared[];
  const int64_t b = blockIdx.x / d.H, h = blockIdx.x % d.H;
  const int64_t K = d.K, V = d.V, width = blockDim.x;
  float* S = shared;
  float* sk = S + K * width;
  float* sq = sk + K;
  const float inv_sqrt_k = rsqrtf(static_cast<float>(K));
  const T* s0 = state + (b * d.H + h) * K * V;
  T* s1 = state_out + (b * d.H + h) * K * V;

  for (int64_t e0 = 0; e0 < V; e0 += width) {
    const int64_t e = e0 + threadIdx.x;
    const bool active = e < V;
    if (active) {
      for (int64_t i = 0; i < K; ++i) S[i * width + threadIdx.x] = Load(s0[i * V + e]);
    }
    for (int64_t t = 0; t < d.T; ++t) {
      const int64_t row = (b * d.T + t) * d.H + h;
      __syncthreads();
      for (int64_t i = threadIdx.x; i < K; i += width) {
        sk[i] = Load(k[row * K + i]);
        sq[i] = Load(q[row * K + i]);
      }
      __syncthreads();
      if (!active) continue;
      const float alpha = __expf(Load(g[row]));
      const float bt = Load(beta[row]);
      float acc = 0.0f;
      for (int64_t i = 0; i < K; ++i) acc += sk[i] * S[i * width + threadIdx.x];
      const float vh = alpha * acc;
      vhat[row * V + e] = Store<T>(vh);
      const float u = bt * (Load(v[row * V + e]) - vh);
      acc = 0.0f;
      for (int64_t i = 0; i < K; ++i) {
        float& sie = S[i * width + threadIdx.x];
        sie = alpha * sie + sk[i] * u;
        acc += sq[i] * sie;
      }
      o[row * V + e] = Store<T>(acc * inv_sqrt_k);
    }
    if (active) {
      for (int64_t i = 0; i < K; ++i) s1[i * V + e] = Store<T>(S[i * width + threadIdx.x]);
    }
    __syncthreads();
  }
}

const char* LastError() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

template <typename T, typename M>
const char* CacheAttentionT(const CacheAttentionDims& d, const void* q, const void* k_cache, const void* v_cache,
                            const int64_t* length, const void* k, const void* v, const M* routed, const void* scale,
                            void* o, cudaStream_t stream) {
  if (d.B == 0 || d.H == 0 || d.T == 0 || d.V == 0) return nullptr;
  if (d.H > 65535 || d.B > 65535) return "CacheAttention (CUDA): B and H must be at most 65535";
  const size_t shared = sizeof(float) * static_cast<size_t>(d.K + d.V + kThreads + kThreads / kWarp);
  auto kernel = CacheAttentionKernel<T, M>;
  if (shared > 48 * 1024) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)) !=
        cudaSuccess) {
      return LastError();
    }
  }
  const dim3 grid(static_cast<unsigned>(d.T), static_cast<unsigned>(d.H), static_cast<unsigned>(d.B));
  kernel<<<grid, kThreads, shared, stream>>>(
      d, static_cast<const T*>(q), static_cast<const T*>(k_cache), static_cast<const T*>(v_cache), length,
      static_cast<const T*>(k), static_cast<const T*>(v), routed, static_cast<const T*>(scale), static_cast<T*>(o));
  return LastError();
}

const char* CopyUnlessShared(const void* in, void* out, size_t bytes, cudaStream_t stream) {
  if (in == out || bytes == 0) return nullptr;
  return cudaMemcpyAsync(out, in, bytes, cudaMemcpyDeviceToDevice, stream) == cudaSuccess ? nullptr : LastError();
}

template <typename T, typename M>
const char* CacheAppendT(const CacheAppendDims& d, Policy policy, const void* k_cache, const void* v_cache,
                         const void* score_cache, const int64_t* length, const void* k, const void* v,
                         const void* score, const M* routed, void* k_out, void* v_out, void* s_out, int64_t* length_out,
                         int64_t* overflow, cudaStream_t stream) {
  const size_t cache = static_cast<size_t>(d.B * d.H * d.C);
  const char* error = CopyUnlessShared(k_cache, k_out, sizeof(T) * cache * d.K, stream);
  if (!error) error = CopyUnlessShared(v_cache, v_out, sizeof(T) * cache * d.V, stream);
  if (!error) error = CopyUnlessShared(score_cache, s_out, sizeof(T) * d.B * d.C, stream);
  if (error || d.B == 0) return error;
  CacheAppendKernel<T, M><<<static_cast<unsigned>(d.B), kThreads, 0, stream>>>(
      d, policy, length, static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(score), routed,
      static_cast<T*>(k_out), static_cast<T*>(v_out), static_cast<T*>(s_out), length_out, overflow);
  return LastError();
}

template <typename T>
const char* GdnPrefillT(const GdnDims& d, const void* q, const void* k, const void* v, const void* g, const void* beta,
                        const void* state, void* o, void* vhat, void* state_out, cudaStream_t stream) {
  if (d.B == 0 || d.H == 0 || d.V == 0) return nullptr;
  // Enough threads for the columns, as many as 48 KiB of shared state allows (at least one warp).
  int64_t width = 256;
  while (width > kWarp && (width > d.V + kWarp - 1 || sizeof(float) * (d.K * width + 2 * d.K) > 48 * 1024)) {
    width -= kWarp;
  }
  const size_t shared = sizeof(float) * static_cast<size_t>(d.K * width + 2 * d.K);
  if (shared > 48 * 1024) return "GdnPrefill (CUDA): K is too large for the state in shared memory (K <= 361)";
  GdnPrefillKernel<T><<<static_cast<unsigned>(d.B * d.H), static_cast<unsigned>(width), shared, stream>>>(
      d, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(g),
      static_cast<const T*>(beta), static_cast<const T*>(state), static_cast<T*>(o), static_cast<T*>(vhat),
      static_cast<T*>(state_out));
  return LastError();
}

}  // namespace

template <typename M>
const char* CacheAttentionM(DType dtype, const CacheAttentionDims& d, const void* q, const void* k_cache,
                            const void* v_cache, const int64_t* length, const void* k, const void* v, const M* routed,
                            const void* scale, void* o, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dtype == DType::kFloat32
             ? CacheAttentionT<float, M>(d, q, k_cache, v_cache, length, k, v, routed, scale, o, s)
             : CacheAttentionT<__half, M>(d, q, k_cache, v_cache, length, k, v, routed, scale, o, s);
}

template <typename M>
const char* CacheAppendM(DType dtype, const CacheAppendDims& d, Policy policy, const void* k_cache, const void* v_cache,
                         const void* score_cache, const int64_t* length, const void* k, const void* v,
                         const void* score, const M* routed, void* k_out, void* v_out, void* s_out, int64_t* length_out,
                         int64_t* overflow, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dtype == DType::kFloat32
             ? CacheAppendT<float, M>(d, policy, k_cache, v_cache, score_cache, length, k, v, score, routed, k_out,
                                      v_out, s_out, length_out, overflow, s)
             : CacheAppendT<__half, M>(d, policy, k_cache, v_cache, score_cache, length, k, v, score, routed, k_out,
                                       v_out, s_out, length_out, overflow, s);
}

const char* CacheAttention(DType dtype, const CacheAttentionDims& d, const void* q, const void* k_cache,
                           const void* v_cache, const int64_t* length, const void* k, const void* v, const bool* routed,
                           const void* scale, void* o, void* stream) {
  return CacheAttentionM(dtype, d, q, k_cache, v_cache, length, k, v, routed, scale, o, stream);
}

const char* CacheAttention(DType dtype, const CacheAttentionDims& d, const void* q, const void* k_cache,
                           const void* v_cache, const int64_t* length, const void* k, const void* v,
                           const int32_t* routed, const void* scale, void* o, void* stream) {
  return CacheAttentionM(dtype, d, q, k_cache, v_cache, length, k, v, routed, scale, o, stream);
}

const char* CacheAppend(DType dtype, const CacheAppendDims& d, Policy policy, const void* k_cache, const void* v_cache,
                        const void* score_cache, const int64_t* length, const void* k, const void* v, const void* score,
                        const bool* routed, void* k_out, void* v_out, void* s_out, int64_t* length_out,
                        int64_t* overflow, void* stream) {
  return CacheAppendM(dtype, d, policy, k_cache, v_cache, score_cache, length, k, v, score, routed, k_out, v_out, s_out,
                      length_out, overflow, stream);
}

const char* CacheAppend(DType dtype, const CacheAppendDims& d, Policy policy, const void* k_cache, const void* v_cache,
                        const void* score_cache, const int64_t* length, const void* k, const void* v, const void* score,
                        const int32_t* routed, void* k_out, void* v_out, void* s_out, int64_t* length_out,
                        int64_t* overflow, void* stream) {
  return CacheAppendM(dtype, d, policy, k_cache, v_cache, score_cache, length, k, v, score, routed, k_out, v_out, s_out,
                      length_out, overflow, stream);
}

const char* GdnPrefill(DType dtype, const GdnDims& d, const void* q, const void* k, const void* v, const void* g,
                       const void* beta, const void* state, void* o, void* vhat, void* state_out, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dtype == DType::kFloat32 ? GdnPrefillT<float>(d, q, k, v, g, beta, state, o, vhat, state_out, s)
                                  : GdnPrefillT<__half>(d, q, k, v, g, beta, state, o, vhat, state_out, s);
}

}  // namespace cuda
}  // namespace ham
