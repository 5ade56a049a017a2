// libtorch custom-op library of the HAM ops: namespace "ham", CPU kernels for float32 and float16.
//
// The op names, schemas (the functional ops and the in-place ham::cache_append_) and input checks come from the op
// specs (../common/ham_op_spec.h, generated from ham_export/ops/spec.py; ../common/ham_op_check.h), the math from
// ham_export/ops/reference.py. The kernels are the raw-pointer CPU kernels shared with the ONNX Runtime library
// (../common/ham_cpu_kernels.h); this file only checks the inputs, allocates new contiguous outputs (functional ops)
// or writes into the given caches (in-place op), and runs the kernels over (batch, head) with at::parallel_for.
// Loaded with torch.ops.load_library in Python, or linked / dlopen'ed in C++, where the code of an AOTInductor
// package of a HAM model calls these ops through the dispatcher.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "ham_cpu_kernels.h"
#include "ham_op_check.h"
#include "ham_op_spec.h"

namespace ham {

template <>
struct Element<c10::Half> {
  static float Load(c10::Half x) { return static_cast<float>(x); }
  static c10::Half Store(float x) { return c10::Half(x); }
};

namespace {

const char* DtypeName(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return "float32";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kDouble:
      return "float64";
    case at::kLong:
      return "int64";
    case at::kInt:
      return "int32";
    case at::kBool:
      return "bool";
    default:
      return c10::toString(type);
  }
}

// The op's check from its spec (ham_op_check.h) for this library's float types (float32, float16) and the CPU.
class Check : public OpCheck {
 public:
  explicit Check(const spec::Op& op)
      : OpCheck(op, std::string(spec::kTorchNamespace) + "::" + op.torch_name, {"float32", "float16"}) {}

  void Input(int i, const at::Tensor& t, const spec::Op& op) {
    TORCH_CHECK(t.defined(), who(), ": input '", op.inputs[i].name, "' is an undefined tensor");
    TORCH_CHECK(t.device().is_cpu(), who(), ": input '", op.inputs[i].name, "' is on ", t.device(),
                "; this library has CPU kernels only");
    OpCheck::Input(i, DtypeName(t.scalar_type()), t.sizes().vec());
    if (op.inputs[i].kind == spec::Kind::kFloat) float_type_ = t.scalar_type();
  }

  at::ScalarType float_type() const { return float_type_; }

 private:
  at::ScalarType float_type_ = at::kFloat;
};

// Runs fn with spec errors turned into torch errors (a RuntimeError in Python).
template <typename Fn>
auto Guarded(Fn&& fn) {
  try {
    return fn();
  } catch (const CheckError& e) {
    TORCH_CHECK(false, e.what());
  }
}

// Calls fn(T{}) with T the storage type of the float inputs (float, or c10::Half for float16).
template <typename Fn>
auto WithFloatType(at::ScalarType type, Fn&& fn) {
  if (type == at::kHalf) return fn(c10::Half{});
  return fn(float{});
}

// ---------------------------------------------------------------------------------------------------------------
at::Tensor CacheAttention(const at::Tensor& q_in, const at::Tensor& k_cache_in, const at::Tensor& v_cache_in,
                          const at::Tensor& length_in, const at::Tensor& k_in, const at::Tensor& v_in,
                          const at::Tensor& routed_in, const at::Tensor& scale_in) {
  namespace in = spec::cache_attention;
  const spec::Op& op = spec::kCacheAttention;
  Check check(op);
  const at::Tensor* inputs[] = {&q_in, &k_cache_in, &v_cache_in, &length_in, &k_in, &v_in, &routed_in, &scale_in};
  Guarded([&] {
    for (int i = 0; i < in::kNumInputs; ++i) check.Input(i, *inputs[i], op);
  });
  const CacheAttentionDims d{check['B'], check['H'], check['T'], check['C'], check['K'], check['V']};
  const at::Tensor q = q_in.contiguous(), k_cache = k_cache_in.contiguous(), v_cache = v_cache_in.contiguous();
  const at::Tensor length = length_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor routed = routed_in.contiguous(), scale = scale_in.contiguous();
  Guarded([&] { check.Values(in::kLength, length.const_data_ptr<int64_t>(), d.B); });
  at::Tensor o = at::empty({d.B, d.H, d.T, d.V}, q.options());
  WithFloatType(check.float_type(), [&](auto zero) {
    using T = decltype(zero);
    const T *qp = q.const_data_ptr<T>(), *kcp = k_cache.const_data_ptr<T>(), *vcp = v_cache.const_data_ptr<T>();
    const T *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>(), *sp = scale.const_data_ptr<T>();
    const int64_t* lp = length.const_data_ptr<int64_t>();
    const bool* rp = routed.const_data_ptr<bool>();
    T* out = o.mutable_data_ptr<T>();
    at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(CacheAttentionScratch(d));
      for (int64_t i = begin; i < end; ++i) {
        CacheAttentionHead(d, i / d.H, i % d.H, qp, kcp, vcp, lp, kp, vp, rp, sp, out, scratch.data());
      }
    });
  });
  return o;
}

// ---------------------------------------------------------------------------------------------------------------
// The cache append into k_out, v_out, s_out (contiguous, holding the caches), length_out and overflow.
void Append(const Check& check, Policy policy, const at::Tensor& length, const at::Tensor& k_in, const at::Tensor& v_in,
            const at::Tensor& score_in, const at::Tensor& routed_in, at::Tensor& k_out, at::Tensor& v_out,
            at::Tensor& s_out, at::Tensor& length_out, at::Tensor& overflow) {
  const CacheAppendDims d{check['B'], check['H'], check['T'], check['C'], check['K'], check['V']};
  const at::Tensor k = k_in.contiguous(), v = v_in.contiguous(), score = score_in.contiguous();
  const at::Tensor routed = routed_in.contiguous();
  WithFloatType(check.float_type(), [&](auto zero) {
    using T = decltype(zero);
    const T *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>(), *sp = score.const_data_ptr<T>();
    const int64_t* lp = length.const_data_ptr<int64_t>();
    const bool* rp = routed.const_data_ptr<bool>();
    T *kc = k_out.mutable_data_ptr<T>(), *vc = v_out.mutable_data_ptr<T>(), *sc = s_out.mutable_data_ptr<T>();
    int64_t *len_out = length_out.mutable_data_ptr<int64_t>(), *over = overflow.mutable_data_ptr<int64_t>();
    // Batch rows are independent (each writes its own slices); the heads of a row share its slot choice.
    at::parallel_for(0, d.B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) CacheAppendRow(d, policy, b, lp, kp, vp, sp, rp, kc, vc, sc, len_out, over);
    });
  });
}

// The inputs and the policy of both forms of cache_append, checked against the spec.
Check CheckAppend(const at::Tensor* inputs[], c10::string_view policy_name, Policy& policy) {
  namespace in = spec::cache_append;
  const spec::Op& op = spec::kCacheAppend;
  Check check(op);
  Guarded([&] {
    for (int i = 0; i < in::kNumInputs; ++i) check.Input(i, *inputs[i], op);
    const int choice = check.Attribute(0, std::string(policy_name).c_str());
    policy = choice == in::kDrop ? Policy::kDrop : Policy::kEvict;
    check.Values(in::kLength, inputs[in::kLength]->contiguous().const_data_ptr<int64_t>(), check['B']);
  });
  return check;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> CacheAppend(
    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& score_cache, const at::Tensor& length_in,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& score, const at::Tensor& routed,
    c10::string_view policy_name) {
  const at::Tensor* inputs[] = {&k_cache, &v_cache, &score_cache, &length_in, &k, &v, &score, &routed};
  Policy policy = Policy::kDrop;
  const Check check = CheckAppend(inputs, policy_name, policy);
  const at::Tensor length = length_in.contiguous();
  // The kernel writes only the slots that receive a token into outputs that already hold the input caches.
  at::Tensor k_out = k_cache.clone(at::MemoryFormat::Contiguous);
  at::Tensor v_out = v_cache.clone(at::MemoryFormat::Contiguous);
  at::Tensor s_out = score_cache.clone(at::MemoryFormat::Contiguous);
  at::Tensor length_out = at::empty({check['B']}, length.options());
  at::Tensor overflow = at::empty({check['B']}, length.options());
  Append(check, policy, length, k, v, score, routed, k_out, v_out, s_out, length_out, overflow);
  return {k_out, v_out, s_out, length_out, overflow};
}

// ham::cache_append_: the same append written into the given caches; only the new entries are written.
at::Tensor CacheAppendInPlace(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& score_cache, at::Tensor& length,
                              const at::Tensor& k, const at::Tensor& v, const at::Tensor& score,
                              const at::Tensor& routed, c10::string_view policy_name) {
  const at::Tensor* inputs[] = {&k_cache, &v_cache, &score_cache, &length, &k, &v, &score, &routed};
  Policy policy = Policy::kDrop;
  const Check check = CheckAppend(inputs, policy_name, policy);
  for (const at::Tensor* cache : {&k_cache, &v_cache, &score_cache, &length}) {
    TORCH_CHECK(cache->is_contiguous(), check.who(), ": the caches written in place must be contiguous");
  }
  const at::Tensor old_length = length.clone();  // the kernel reads the old length while it writes the new one
  at::Tensor overflow = at::empty({check['B']}, length.options());
  Append(check, policy, old_length, k, v, score, routed, k_cache, v_cache, score_cache, length, overflow);
  return overflow;
}

// ---------------------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> GdnPrefill(const at::Tensor& q_in, const at::Tensor& k_in,
                                                          const at::Tensor& v_in, const at::Tensor& g_in,
                                                          const at::Tensor& beta_in, const at::Tensor& state_in) {
  namespace in = spec::gdn_prefill;
  const spec::Op& op = spec::kGdnPrefill;
  Check check(op);
  const at::Tensor* inputs[] = {&q_in, &k_in, &v_in, &g_in, &beta_in, &state_in};
  Guarded([&] {
    for (int i = 0; i < in::kNumInputs; ++i) check.Input(i, *inputs[i], op);
  });
  const GdnDims d{check['B'], check['T'], check['H'], check['K'], check['V']};
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), g = g_in.contiguous();
  const at::Tensor beta = beta_in.contiguous(), state = state_in.contiguous();
  at::Tensor o = at::empty({d.B, d.T, d.H, d.V}, q.options());
  at::Tensor vhat = at::empty({d.B, d.T, d.H, d.V}, q.options());
  at::Tensor state_out = at::empty({d.B, d.H, d.K, d.V}, q.options());
  WithFloatType(check.float_type(), [&](auto zero) {
    using T = decltype(zero);
    const T *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
    const T *gp = g.const_data_ptr<T>(), *bp = beta.const_data_ptr<T>(), *sp = state.const_data_ptr<T>();
    T *op_ = o.mutable_data_ptr<T>(), *vh = vhat.mutable_data_ptr<T>(), *so = state_out.mutable_data_ptr<T>();
    at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(GdnPrefillScratch(d));
      for (int64_t i = begin; i < end; ++i) {
        GdnPrefillHead(d, i / d.H, i % d.H, qp, kp, vp, gp, bp, sp, op_, vh, so, scratch.data());
      }
    });
  });
  return {o, vhat, state_out};
}

}  // namespace
}  // namespace ham

namespace {

// Registered with torch::Library objects rather than TORCH_LIBRARY: when the process already has the ham namespace
// (Python's ham_export.ops.library), the macro's static initializer would throw inside dlopen and abort the process.
// Here the library then registers nothing and says so; the ops already there keep running.
struct Registration {
  std::unique_ptr<torch::Library> def;
  std::unique_ptr<torch::Library> cpu;

  Registration() {
    const std::string probe = std::string(ham::spec::kTorchNamespace) + "::" + ham::spec::kCacheAttention.torch_name;
    if (c10::Dispatcher::singleton().findSchema({probe.c_str(), ""}).has_value()) {
      TORCH_WARN(
          "libham_torch_ops: the ham ops are already registered in this process (by ham_export.ops.library?); "
          "this library registers nothing");
      return;
    }
    // The schemas of the op specs (ham_op_spec.h): the functional ops and the in-place ham::cache_append_.
    using namespace ham::spec;
    def = std::make_unique<torch::Library>(torch::Library::DEF, kTorchNamespace, std::nullopt, __FILE__, __LINE__);
    for (const Op* op : kOps) {
      def->def((std::string(op->torch_name) + op->torch_schema).c_str());
      if (op->inplace_name[0] != '\0') def->def((std::string(op->inplace_name) + op->inplace_schema).c_str());
    }
    cpu = std::make_unique<torch::Library>(torch::Library::IMPL, kTorchNamespace, c10::DispatchKey::CPU, __FILE__,
                                           __LINE__);
    cpu->impl(kCacheAttention.torch_name, &ham::CacheAttention);
    cpu->impl(kCacheAppend.torch_name, &ham::CacheAppend);
    cpu->impl(kCacheAppend.inplace_name, &ham::CacheAppendInPlace);
    cpu->impl(kGdnPrefill.torch_name, &ham::GdnPrefill);
  }
};

const Registration registration;

}  // namespace
