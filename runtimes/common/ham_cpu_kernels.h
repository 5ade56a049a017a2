// CPU kernels of the HAM ops over raw pointers, free of ONNX Runtime types.
//
// Each kernel follows its reference in ham_export/ops/reference.py: same argument order, names and layouts (row-major,
// the shapes below). The adapters in ham_ort_ops.cc validate shapes and allocate outputs; these functions trust
// them. Storage type T is float or a 16-bit float with an Element<T> specialization; arithmetic is in float.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "ham_op_spec.h"

namespace ham {

// Load and store of one element as float; specialized for each storage type.
template <typename T>
struct Element;

template <>
struct Element<float> {
  static float Load(float x) { return x; }
  static float Store(float x) { return x; }
};

// a . b in float, over kLanes independent partial sums (a single running sum is one long chain of dependent adds,
// which the compiler may not reorder into vector lanes; these it packs into SIMD registers).
template <typename T>
inline float Dot(const T* a, const T* b, int64_t n) {
  constexpr int64_t kLanes = 8;
  float lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lane[j] += Element<T>::Load(a[i + j]) * Element<T>::Load(b[i + j]);
  }
  for (; i < n; ++i) lane[0] += Element<T>::Load(a[i]) * Element<T>::Load(b[i]);
  return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
}

// ---------------------------------------------------------------------------------------------------------------
// CacheAttention(q, k_cache, v_cache, length, k, v, routed, scale) -> o     (reference.cache_attention)
//   q [B,H,T,K]; k_cache [B,H,C,K]; v_cache [B,H,C,V]; length [B] in [0, C]; k [B,H,T,K]; v [B,H,T,V];
//   routed [B,T]; scale [H]; o [B,H,T,V].
// Query t attends over cache entries [0, length[b]) and the new tokens s <= t with routed[b, s]; logits are
// scale[h] * (q . k); o = 0 for a query that sees no key. Cache entries past length are never read.
struct CacheAttentionDims {
  int64_t B, H, T, C, K, V;
};

// Scratch floats CacheAttentionHead needs.
inline size_t CacheAttentionScratch(const CacheAttentionDims& d) { return static_cast<size_t>(d.C + d.T + d.V); }

// One (b, h) pair; scratch holds CacheAttentionScratch(d) floats.
template <typename T>
void CacheAttentionHead(const CacheAttentionDims& d, int64_t b, int64_t h, const T* q, const T* k_cache,
                        const T* v_cache, const int64_t* length, const T* k, const T* v, const bool* routed,
                        const T* scale, T* o, float* scratch) {
  const int64_t bh = b * d.H + h;
  const int64_t len = length[b];
  const float s = Element<T>::Load(scale[h]);
  const T* qh = q + bh * d.T * d.K;
  const T* kc = k_cache + bh * d.C * d.K;
  const T* vc = v_cache + bh * d.C * d.V;
  const T* kn = k + bh * d.T * d.K;
  const T* vn = v + bh * d.T * d.V;
  const bool* rb = routed + b * d.T;
  T* oh = o + bh * d.T * d.V;
  float* logit = scratch;            // [len + T]: cache entries, then new tokens
  float* acc = scratch + d.C + d.T;  // [V]

  for (int64_t t = 0; t < d.T; ++t) {
    const T* qt = qh + t * d.K;
    float top = -std::numeric_limits<float>::infinity();
    bool any = len > 0;
    for (int64_t c = 0; c < len; ++c) {
      logit[c] = s * Dot(qt, kc + c * d.K, d.K);
      top = std::fmax(top, logit[c]);
    }
    for (int64_t j = 0; j <= t; ++j) {
      if (!rb[j]) continue;
      any = true;
      logit[len + j] = s * Dot(qt, kn + j * d.K, d.K);
      top = std::fmax(top, logit[len + j]);
    }
    T* ot = oh + t * d.V;
    if (!any) {
      for (int64_t e = 0; e < d.V; ++e) ot[e] = Element<T>::Store(0.0f);
      continue;
    }
    for (int64_t e = 0; e < d.V; ++e) acc[e] = 0.0f;
    float total = 0.0f;
    for (int64_t c = 0; c < len; ++c) {
      const float w = std::exp(logit[c] - top);
      total += w;
      const T* vrow = vc + c * d.V;
      for (int64_t e = 0; e < d.V; ++e) acc[e] += w * Element<T>::Load(vrow[e]);
    }
    for (int64_t j = 0; j <= t; ++j) {
      if (!rb[j]) continue;
      const float w = std::exp(logit[len + j] - top);
      total += w;
      const T* vrow = vn + j * d.V;
      for (int64_t e = 0; e < d.V; ++e) acc[e] += w * Element<T>::Load(vrow[e]);
    }
    const float inv = total > 0.0f ? 1.0f / total : 1.0f;
    for (int64_t e = 0; e < d.V; ++e) ot[e] = Element<T>::Store(acc[e] * inv);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// CacheAppend(k_cache, v_cache, score_cache, length, k, v, score, routed; policy)
//     -> k_cache_out, v_cache_out, score_cache_out, length_out, overflow             (reference.cache_append)
//   k_cache [B,H,C,K]; v_cache [B,H,C,V]; score_cache [B,C]; length [B] in [0, C]; k [B,H,T,K]; v [B,H,T,V];
//   score [B,T]; routed [B,T]; length_out, overflow [B].
// The routed tokens land at [length, ...) in order; a routed token that finds the cache full counts in overflow
// and, under evict, replaces the slot of lowest score key (EvictKey; the lowest slot among equal keys) if its own
// key is strictly higher (a NaN score in the cache is the lowest, as torch.argmin has it, and is never replaced
// since nothing compares greater than NaN).
enum class Policy { kDrop, kEvict };

// The key eviction compares: the score rounded to the grid 1 / spec::kEvictGrid (exact in float; NaN stays NaN).
inline float EvictKey(float score) { return std::floor(score * spec::kEvictGrid + 0.5f); }

struct CacheAppendDims {
  int64_t B, H, T, C, K, V;
};

// One batch row b. k_out, v_out and s_out must already hold the input caches (a copy, or the same buffers when
// the caller shares them); only the slots that receive a token are written.
template <typename T>
void CacheAppendRow(const CacheAppendDims& d, Policy policy, int64_t b, const int64_t* length, const T* k, const T* v,
                    const T* score, const bool* routed, T* k_out, T* v_out, T* s_out, int64_t* length_out,
                    int64_t* overflow) {
  int64_t len = length[b];
  int64_t over = 0;
  T* sb = s_out + b * d.C;
  for (int64_t t = 0; t < d.T; ++t) {
    if (!routed[b * d.T + t]) continue;
    int64_t slot = -1;
    if (len < d.C) {
      slot = len++;
    } else {
      ++over;
      if (policy == Policy::kEvict && d.C > 0) {
        int64_t low = 0;
        float low_key = EvictKey(Element<T>::Load(sb[0]));
        for (int64_t c = 0; c < d.C && !std::isnan(low_key); ++c) {
          const float key = EvictKey(Element<T>::Load(sb[c]));
          if (std::isnan(key) || key < low_key) {
            low = c;
            low_key = key;
          }
        }
        if (EvictKey(Element<T>::Load(score[b * d.T + t])) > low_key) slot = low;
      }
    }
    if (slot < 0) continue;
    for (int64_t h = 0; h < d.H; ++h) {
      const int64_t bh = b * d.H + h;
      std::memcpy(k_out + (bh * d.C + slot) * d.K, k + (bh * d.T + t) * d.K, sizeof(T) * d.K);
      std::memcpy(v_out + (bh * d.C + slot) * d.V, v + (bh * d.T + t) * d.V, sizeof(T) * d.V);
    }
    sb[slot] = score[b * d.T + t];
  }
  length_out[b] = len;
  overflow[b] = over;
}

// ---------------------------------------------------------------------------------------------------------------
// GdnPrefill(q, k, v, g, beta, state) -> o, vhat, state_out          (reference.gdn_recurrent, the plain loop)
//   q, k [B,T,H,K]; v [B,T,H,V]; g, beta [B,T,H]; state [B,H,K,V]; o, vhat [B,T,H,V]; state_out [B,H,K,V].
// Per token, with alpha = exp(g): vhat = alpha (k^T S); S <- alpha S + beta k (v - vhat)^T; o = (q^T S) / sqrt(K).
struct GdnDims {
  int64_t B, T, H, K, V;
};

// Scratch floats GdnPrefillHead needs.
inline size_t GdnPrefillScratch(const GdnDims& d) { return static_cast<size_t>(d.K * d.V + 2 * d.V); }

// One (b, h) pair; scratch holds GdnPrefillScratch(d) floats. state and state_out may be the same buffer.
template <typename T>
void GdnPrefillHead(const GdnDims& d, int64_t b, int64_t h, const T* q, const T* k, const T* v, const T* g,
                    const T* beta, const T* state, T* o, T* vhat, T* state_out, float* scratch) {
  const int64_t K = d.K, V = d.V;
  float* S = scratch;          // [K, V] the running state, in float
  float* u = scratch + K * V;  // [V] beta (v - vhat)
  float* acc = u + V;          // [V]
  const T* s0 = state + (b * d.H + h) * K * V;
  for (int64_t i = 0; i < K * V; ++i) S[i] = Element<T>::Load(s0[i]);
  const float inv_sqrt_k = 1.0f / std::sqrt(static_cast<float>(K));

  for (int64_t t = 0; t < d.T; ++t) {
    const int64_t row = (b * d.T + t) * d.H + h;
    const T* qt = q + row * K;
    const T* kt = k + row * K;
    const T* vt = v + row * V;
    const float alpha = std::exp(Element<T>::Load(g[row]));
    const float bt = Element<T>::Load(beta[row]);

    for (int64_t e = 0; e < V; ++e) acc[e] = 0.0f;
    for (int64_t i = 0; i < K; ++i) {
      const float ki = Element<T>::Load(kt[i]);
      const float* Si = S + i * V;
      for (int64_t e = 0; e < V; ++e) acc[e] += ki * Si[e];
    }
    T* vhat_t = vhat + row * V;
    for (int64_t e = 0; e < V; ++e) {
      const float vh = alpha * acc[e];
      vhat_t[e] = Element<T>::Store(vh);
      u[e] = bt * (Element<T>::Load(vt[e]) - vh);
    }
    for (int64_t i = 0; i < K; ++i) {
      const float ki = Element<T>::Load(kt[i]);
      float* Si = S + i * V;
      for (int64_t e = 0; e < V; ++e) Si[e] = alpha * Si[e] + ki * u[e];
    }
    for (int64_t e = 0; e < V; ++e) acc[e] = 0.0f;
    for (int64_t i = 0; i < K; ++i) {
      const float qi = Element<T>::Load(qt[i]);
      const float* Si = S + i * V;
      for (int64_t e = 0; e < V; ++e) acc[e] += qi * Si[e];
    }
    T* ot = o + row * V;
    for (int64_t e = 0; e < V; ++e) ot[e] = Element<T>::Store(acc[e] * inv_sqrt_k);
  }

  T* s1 = state_out + (b * d.H + h) * K * V;
  for (int64_t i = 0; i < K * V; ++i) s1[i] = Element<T>::Store(S[i]);
}

}  // namespace ham
