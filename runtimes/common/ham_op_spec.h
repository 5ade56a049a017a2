// The HAM op specs for C++, generated from ham_export/ops/spec.py by `python -m ham_export.ops.cpp`.
// Do not edit: tests/ops/test_spec.py fails when this file differs from what the generator writes.
//
// Dtype kinds: kFloat (the op's float type, one per call), kInt64, kBool. Shape letters: B batch, H heads,
// T new tokens, C cache capacity, K key width, V value width; every size is at least kMinSize. A Bound says
// low <= value <= size of a letter. runtimes/common/ham_op_check.h checks a call against an Op.
#pragma once

#include <cstdint>

// Generated: one line per item, schemas and docs unbroken.
// clang-format off
namespace ham {
namespace spec {

enum class Kind { kFloat, kInt64, kBool };

struct Arg {
  const char* name;
  Kind kind;
  const char* letters;  // one shape letter per dimension
};

struct Attr {
  const char* name;
  const char* const* choices;
  int num_choices;
};

struct Bound {  // low <= input's values <= size of letter high
  int input;
  int64_t low;
  char high;
};

struct Op {
  const char* onnx_name;
  const char* torch_name;
  int version;
  const Arg* inputs;
  int num_inputs;
  const Arg* outputs;
  int num_outputs;
  const Attr* attributes;
  int num_attributes;
  const Bound* bounds;
  int num_bounds;
  const char* torch_schema;    // after the name: "(Tensor q, ...) -> Tensor"
  const char* inplace_name;    // the in-place form, "" when there is none
  const char* inplace_schema;  // its schema, "" when there is none
};

inline constexpr char kOnnxDomain[] = "ham.ai";
inline constexpr int kOnnxDomainVersion = 1;
inline constexpr char kTorchNamespace[] = "ham";
inline constexpr int64_t kMinSize = 1;
inline constexpr int64_t kInvalidLength = -1;  // overflow of a row a device kernel refused
inline constexpr float kEvictGrid = 1024.0f;  // eviction key: floor(float(score) * kEvictGrid + 0.5f)

// CacheAttention (ham::cache_attention, version 1): Query t attends over cache entries [0, length) and the routed new tokens s <= t.
// On a device: a device kernel that finds length[b] outside [0, C] leaves row b untouched (no read, no write), writes NaN to its attention output and -1 to its overflow.
namespace cache_attention {

enum Input { kQ, kKCache, kVCache, kLength, kK, kV, kRouted, kScale, kNumInputs };
enum Output { kO, kNumOutputs };
inline constexpr Arg kInputs[] = {
    {"q", Kind::kFloat, "BHTK"},
    {"k_cache", Kind::kFloat, "BHCK"},
    {"v_cache", Kind::kFloat, "BHCV"},
    {"length", Kind::kInt64, "B"},
    {"k", Kind::kFloat, "BHTK"},
    {"v", Kind::kFloat, "BHTV"},
    {"routed", Kind::kBool, "BT"},
    {"scale", Kind::kFloat, "H"},
};
inline constexpr Arg kOutputs[] = {
    {"o", Kind::kFloat, "BHTV"},
};
inline constexpr Bound kBounds[] = {
    {kLength, 0, 'C'},  // valid cache entries: never negative, never past the capacity
};

}  // namespace cache_attention

inline constexpr Op kCacheAttention{
    "CacheAttention",
    "cache_attention",
    1,
    cache_attention::kInputs,
    cache_attention::kNumInputs,
    cache_attention::kOutputs,
    cache_attention::kNumOutputs,
    nullptr,
    0,
    cache_attention::kBounds,
    1,
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor length, Tensor k, Tensor v, Tensor routed, Tensor scale) -> Tensor",
    "",
    ""};

// CacheAppend (ham::cache_append, version 1): Store the routed new tokens at [length, ...) in order; at capacity the policy applies.
// On a device: a device kernel that finds length[b] outside [0, C] leaves row b untouched (no read, no write), writes NaN to its attention output and -1 to its overflow.
namespace cache_append {

enum Input { kKCache, kVCache, kScoreCache, kLength, kK, kV, kScore, kRouted, kNumInputs };
enum Output { kKCacheOut, kVCacheOut, kScoreCacheOut, kLengthOut, kOverflow, kNumOutputs };
inline constexpr Arg kInputs[] = {
    {"k_cache", Kind::kFloat, "BHCK"},
    {"v_cache", Kind::kFloat, "BHCV"},
    {"score_cache", Kind::kFloat, "BC"},
    {"length", Kind::kInt64, "B"},
    {"k", Kind::kFloat, "BHTK"},
    {"v", Kind::kFloat, "BHTV"},
    {"score", Kind::kFloat, "BT"},
    {"routed", Kind::kBool, "BT"},
};
inline constexpr Arg kOutputs[] = {
    {"k_cache_out", Kind::kFloat, "BHCK"},
    {"v_cache_out", Kind::kFloat, "BHCV"},
    {"score_cache_out", Kind::kFloat, "BC"},
    {"length_out", Kind::kInt64, "B"},
    {"overflow", Kind::kInt64, "B"},
};
inline constexpr const char* kPolicyChoices[] = {"drop", "evict"};
enum Policy { kDrop, kEvict };
inline constexpr Attr kAttributes[] = {
    {"policy", kPolicyChoices, 2},
};
inline constexpr Bound kBounds[] = {
    {kLength, 0, 'C'},  // valid cache entries: never negative, never past the capacity
};

}  // namespace cache_append

inline constexpr Op kCacheAppend{
    "CacheAppend",
    "cache_append",
    1,
    cache_append::kInputs,
    cache_append::kNumInputs,
    cache_append::kOutputs,
    cache_append::kNumOutputs,
    cache_append::kAttributes,
    1,
    cache_append::kBounds,
    1,
    "(Tensor k_cache, Tensor v_cache, Tensor score_cache, Tensor length, Tensor k, Tensor v, Tensor score, Tensor routed, str policy) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "cache_append_",
    "(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) score_cache, Tensor(d!) length, Tensor k, Tensor v, Tensor score, Tensor routed, str policy) -> Tensor"};

// GdnPrefill (ham::gdn_prefill, version 1): The gated delta rule over T tokens from a given state.
namespace gdn_prefill {

enum Input { kQ, kK, kV, kG, kBeta, kState, kNumInputs };
enum Output { kO, kVhat, kStateOut, kNumOutputs };
inline constexpr Arg kInputs[] = {
    {"q", Kind::kFloat, "BTHK"},
    {"k", Kind::kFloat, "BTHK"},
    {"v", Kind::kFloat, "BTHV"},
    {"g", Kind::kFloat, "BTH"},
    {"beta", Kind::kFloat, "BTH"},
    {"state", Kind::kFloat, "BHKV"},
};
inline constexpr Arg kOutputs[] = {
    {"o", Kind::kFloat, "BTHV"},
    {"vhat", Kind::kFloat, "BTHV"},
    {"state_out", Kind::kFloat, "BHKV"},
};

}  // namespace gdn_prefill

inline constexpr Op kGdnPrefill{
    "GdnPrefill",
    "gdn_prefill",
    1,
    gdn_prefill::kInputs,
    gdn_prefill::kNumInputs,
    gdn_prefill::kOutputs,
    gdn_prefill::kNumOutputs,
    nullptr,
    0,
    nullptr,
    0,
    "(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor state) -> (Tensor, Tensor, Tensor)",
    "",
    ""};

inline constexpr const Op* kOps[] = {&kCacheAttention, &kCacheAppend, &kGdnPrefill};

}  // namespace spec
}  // namespace ham
// clang-format on
