// CUDA launchers of the HAM ops over raw device pointers and a stream (built with -DHAM_ORT_CUDA=ON).
//
// Same arguments, layouts and math as the CPU kernels in ham_cpu_kernels.h; this header needs no CUDA header, so
// a C++ adapter (the ORT op library, the TensorRT plugin library) can call them. Each returns a CUDA error string, or
// nullptr on success. `length` lives on the device, where the adapter cannot check it without a synchronisation: a
// row whose length lies outside [0, C] is refused in the kernel, as the op spec says (ham_op_spec.h): nothing of
// its cache is read or written, its attention output is NaN, its overflow spec::kInvalidLength (-1).
#pragma once

#include <cstdint>

#include "ham_cpu_kernels.h"

namespace ham {
namespace cuda {

enum class DType { kFloat32, kFloat16 };

// routed: bool (ONNX Runtime) or int32_t (TensorRT plugins take no bool I/O), nonzero meaning routed.
const char* CacheAttention(DType dtype, const CacheAttentionDims& d, const void* q, const void* k_cache,
                           const void* v_cache, const int64_t* length, const void* k, const void* v, const bool* routed,
                           const void* scale, void* o, void* stream);
const char* CacheAttention(DType dtype, const CacheAttentionDims& d, const void* q, const void* k_cache,
                           const void* v_cache, const int64_t* length, const void* k, const void* v,
                           const int32_t* routed, const void* scale, void* o, void* stream);

// k_out, v_out and s_out are copied from the inputs first (on the stream) unless they are the same buffers.
const char* CacheAppend(DType dtype, const CacheAppendDims& d, Policy policy, const void* k_cache, const void* v_cache,
                        const void* score_cache, const int64_t* length, const void* k, const void* v, const void* score,
                        const bool* routed, void* k_out, void* v_out, void* s_out, int64_t* length_out,
                        int64_t* overflow, void* stream);
const char* CacheAppend(DType dtype, const CacheAppendDims& d, Policy policy, const void* k_cache, const void* v_cache,
                        const void* score_cache, const int64_t* length, const void* k, const void* v, const void* score,
                        const int32_t* routed, void* k_out, void* v_out, void* s_out, int64_t* length_out,
                        int64_t* overflow, void* stream);

const char* GdnPrefill(DType dtype, const GdnDims& d, const void* q, const void* k, const void* v, const void* g,
                       const void* beta, const void* state, void* o, void* vhat, void* state_out, void* stream);

}  // namespace cuda
}  // namespace ham
