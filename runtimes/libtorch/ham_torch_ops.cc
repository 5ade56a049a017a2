// libtorch custom-op library of the HAM ops: namespace "ham", CPU kernels for float32 and float16.
//
// The schemas are those of ham_export/opspec.py (OpSpec.torch_schema(); tests/test_torch_ops.py checks that they
// agree), the math that of ham_export/reference.py. The kernels are the raw-pointer CPU kernels of the ONNX Runtime
// library (runtimes/onnxruntime/ham_cpu_kernels.h); this file only checks the inputs, allocates new contiguous
// outputs (the ops are functional) and runs the kernels over (batch, head) with at::parallel_for. Loaded with
// torch.ops.load_library in Python, or linked / dlopen'ed in C++, where the code of an AOTInductor package of a HAM
// model calls these ops through the dispatcher.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "ham_cpu_kernels.h"

namespace ham {

template <>
struct Element<c10::Half> {
  static float Load(c10::Half x) { return static_cast<float>(x); }
  static c10::Half Store(float x) { return c10::Half(x); }
};

namespace {

std::string ShapeString(at::IntArrayRef shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

std::string Letters(const std::string& letters) {
  std::string out = "[";
  for (size_t i = 0; i < letters.size(); ++i) (out += (i ? ", " : "")) += letters[i];
  return out + "]";
}

// Checks each input against the letters of its spec (e.g. "BHTK" for [B, H, T, K]), binding each letter to a size
// at its first sight (a later mismatch names both inputs), and its dtype and device: float inputs ("float") share
// the dtype of the first one, float32 or float16; length is int64, routed bool; everything on the CPU.
class InputCheck {
 public:
  explicit InputCheck(const char* op) : op_(std::string("ham::") + op) {}

  void operator()(const char* name, const at::Tensor& t, const std::string& letters, const char* kind = "float") {
    TORCH_CHECK(t.defined(), op_, ": input '", name, "' is an undefined tensor");
    TORCH_CHECK(t.device().is_cpu(), op_, ": input '", name, "' is on ", t.device(),
                "; this library has CPU kernels only");
    const std::string want(kind);
    if (want == "float") {
      if (float_name_.empty()) {
        TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf, op_, ": input '", name, "' is ",
                    t.scalar_type(), "; the float inputs must be Float (float32) or Half (float16)");
        float_type_ = t.scalar_type();
        float_name_ = name;
      } else {
        TORCH_CHECK(t.scalar_type() == float_type_, op_, ": input '", name, "' is ", t.scalar_type(), ", expected ",
                    float_type_, " like input '", float_name_, "'");
      }
    } else {
      const at::ScalarType expected = want == "int64" ? at::kLong : at::kBool;
      TORCH_CHECK(t.scalar_type() == expected, op_, ": input '", name, "' is ", t.scalar_type(), ", expected ",
                  expected);
    }
    TORCH_CHECK(t.dim() == static_cast<int64_t>(letters.size()), op_, ": input '", name, "' has shape ",
                ShapeString(t.sizes()), " (rank ", t.dim(), "), expected rank ", letters.size(), ": ",
                Letters(letters));
    for (size_t i = 0; i < letters.size(); ++i) {
      Dim& dim = dims_[Index(letters[i])];
      if (dim.from.empty()) {
        dim.size = t.size(static_cast<int64_t>(i));
        dim.from = name;
      } else {
        TORCH_CHECK(dim.size == t.size(static_cast<int64_t>(i)), op_, ": input '", name, "' has shape ",
                    ShapeString(t.sizes()), ", expected ", Letters(letters), " with ", letters[i], " = ", dim.size,
                    " (from input '", dim.from, "')");
      }
    }
  }

  int64_t operator[](char letter) const { return dims_[Index(letter)].size; }
  at::ScalarType float_type() const { return float_type_; }

  // 0 <= length[b] <= C for every b: the kernels index the cache with it.
  void Length(const int64_t* length, int64_t batch, int64_t capacity) const {
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK(length[b] >= 0 && length[b] <= capacity, op_, ": input 'length' holds ", length[b], " at batch ", b,
                  ", outside [0, C] with cache capacity C = ", capacity);
    }
  }

 private:
  struct Dim {
    int64_t size = 0;
    std::string from;
  };
  static size_t Index(char letter) { return static_cast<unsigned char>(letter) % 32; }

  std::string op_;
  Dim dims_[32];
  at::ScalarType float_type_ = at::kFloat;
  std::string float_name_;
};

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
  InputCheck check("cache_attention");
  check("q", q_in, "BHTK");
  check("k_cache", k_cache_in, "BHCK");
  check("v_cache", v_cache_in, "BHCV");
  check("length", length_in, "B", "int64");
  check("k", k_in, "BHTK");
  check("v", v_in, "BHTV");
  check("routed", routed_in, "BT", "bool");
  check("scale", scale_in, "H");
  const CacheAttentionDims d{check['B'], check['H'], check['T'], check['C'], check['K'], check['V']};
  const at::Tensor q = q_in.contiguous(), k_cache = k_cache_in.contiguous(), v_cache = v_cache_in.contiguous();
  const at::Tensor length = length_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor routed = routed_in.contiguous(), scale = scale_in.contiguous();
  check.Length(length.const_data_ptr<int64_t>(), d.B, d.C);
  at::Tensor o = at::empty({d.B, d.H, d.T, d.V}, q.options());
  if (o.numel() == 0) return o;
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
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> CacheAppend(
    const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& score_cache, const at::Tensor& length_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& score_in, const at::Tensor& routed_in,
    c10::string_view policy_name) {
  TORCH_CHECK(policy_name == "drop" || policy_name == "evict", "ham::cache_append: policy is \"",
              std::string(policy_name), "\"; it must be \"drop\" or \"evict\"");
  const Policy policy = policy_name == "drop" ? Policy::kDrop : Policy::kEvict;
  InputCheck check("cache_append");
  check("k_cache", k_cache, "BHCK");
  check("v_cache", v_cache, "BHCV");
  check("score_cache", score_cache, "BC");
  check("length", length_in, "B", "int64");
  check("k", k_in, "BHTK");
  check("v", v_in, "BHTV");
  check("score", score_in, "BT");
  check("routed", routed_in, "BT", "bool");
  const CacheAppendDims d{check['B'], check['H'], check['T'], check['C'], check['K'], check['V']};
  const at::Tensor length = length_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor score = score_in.contiguous(), routed = routed_in.contiguous();
  check.Length(length.const_data_ptr<int64_t>(), d.B, d.C);
  // The kernel writes only the slots that receive a token into outputs that already hold the input caches.
  at::Tensor k_out = k_cache.clone(at::MemoryFormat::Contiguous);
  at::Tensor v_out = v_cache.clone(at::MemoryFormat::Contiguous);
  at::Tensor s_out = score_cache.clone(at::MemoryFormat::Contiguous);
  at::Tensor length_out = at::empty({d.B}, length.options());
  at::Tensor overflow = at::empty({d.B}, length.options());
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
  return {k_out, v_out, s_out, length_out, overflow};
}

// ---------------------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> GdnPrefill(const at::Tensor& q_in, const at::Tensor& k_in,
                                                          const at::Tensor& v_in, const at::Tensor& g_in,
                                                          const at::Tensor& beta_in, const at::Tensor& state_in) {
  InputCheck check("gdn_prefill");
  check("q", q_in, "BTHK");
  check("k", k_in, "BTHK");
  check("v", v_in, "BTHV");
  check("g", g_in, "BTH");
  check("beta", beta_in, "BTH");
  check("state", state_in, "BHKV");
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
    T *op = o.mutable_data_ptr<T>(), *vh = vhat.mutable_data_ptr<T>(), *so = state_out.mutable_data_ptr<T>();
    at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(GdnPrefillScratch(d));
      for (int64_t i = begin; i < end; ++i) {
        GdnPrefillHead(d, i / d.H, i % d.H, qp, kp, vp, gp, bp, sp, op, vh, so, scratch.data());
      }
    });
  });
  return {o, vhat, state_out};
}

}  // namespace
}  // namespace ham

namespace {

// Registered with torch::Library objects rather than TORCH_LIBRARY: when the process already has the ham namespace
// (Python's ham_export.ops), the macro's static initializer would throw inside dlopen and abort the process. Here
// the library then registers nothing and says so; the ops already there keep running.
struct Registration {
  std::unique_ptr<torch::Library> def;
  std::unique_ptr<torch::Library> cpu;

  Registration() {
    if (c10::Dispatcher::singleton().findSchema({"ham::cache_attention", ""}).has_value()) {
      TORCH_WARN(
          "libham_torch_ops: the ham ops are already registered in this process (by ham_export.ops?); "
          "this library registers nothing");
      return;
    }
    // The schemas of OpSpec.torch_schema() (ham_export/opspec.py), argument for argument.
    def = std::make_unique<torch::Library>(torch::Library::DEF, "ham", std::nullopt, __FILE__, __LINE__);
    def->def(
        "cache_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor length, Tensor k, Tensor v, Tensor routed, "
        "Tensor scale) -> Tensor");
    def->def(
        "cache_append(Tensor k_cache, Tensor v_cache, Tensor score_cache, Tensor length, Tensor k, Tensor v, "
        "Tensor score, Tensor routed, str policy) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
    def->def(
        "gdn_prefill(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, Tensor state) -> (Tensor, Tensor, Tensor)");
    cpu = std::make_unique<torch::Library>(torch::Library::IMPL, "ham", c10::DispatchKey::CPU, __FILE__, __LINE__);
    cpu->impl("cache_attention", &ham::CacheAttention);
    cpu->impl("cache_append", &ham::CacheAppend);
    cpu->impl("gdn_prefill", &ham::GdnPrefill);
  }
};

const Registration registration;

}  // namespace
