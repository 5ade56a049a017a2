// What a HAM op's TensorRT plugin is, from its spec (ham_op_spec.h) and without TensorRT: its name, the dtype of
// each input and output as the plugin sees it (a bool becomes int32: TensorRT plugins take no bool I/O), the input
// each output's shape letter comes from, and the aliased outputs (the caches of the append, in place). The same
// rules as plugins_trt/specs.py; tests/plugins_trt/test_cpp_rules.py compiles rules_dump.cc and compares.
#pragma once

#include <cstring>
#include <string>

#include "ham_op_spec.h"

namespace ham {
namespace trt_rules {

inline constexpr char kVersion[] = "1";
inline constexpr char kNamespace[] = "ham_cpp";  // the QDPs are "ham": both can be registered in one process

enum class PluginKind { kFloat, kInt64, kInt32 };

inline std::string PluginName(const spec::Op& op) { return std::string("Ham") + op.onnx_name; }

inline PluginKind Kind(const spec::Arg& arg) {
  switch (arg.kind) {
    case spec::Kind::kFloat:
      return PluginKind::kFloat;
    case spec::Kind::kInt64:
      return PluginKind::kInt64;
    case spec::Kind::kBool:
      return PluginKind::kInt32;
  }
  return PluginKind::kInt32;
}

// The first float input: its dtype is the op's float type T.
inline int FirstFloatInput(const spec::Op& op) {
  for (int i = 0; i < op.num_inputs; ++i) {
    if (op.inputs[i].kind == spec::Kind::kFloat) return i;
  }
  return -1;
}

struct Source {
  int input;
  int dim;
};

// Where a shape letter is first seen among the inputs ({-1, -1}: nowhere).
inline Source LetterSource(const spec::Op& op, char letter) {
  for (int i = 0; i < op.num_inputs; ++i) {
    const char* letters = op.inputs[i].letters;
    for (int d = 0; letters[d] != '\0'; ++d) {
      if (letters[d] == letter) return {i, d};
    }
  }
  return {-1, -1};
}

// The input an output aliases (-1: none). An op with an in-place form writes its inputs X to outputs "X_out"; the
// caches keep their storage, the length does not (one program would read it while another writes it): it is a
// separate output.
inline int AliasedInput(const spec::Op& op, int output) {
  if (op.inplace_name[0] == '\0' || output < 0 || output >= op.num_outputs) return -1;
  const std::string name = op.outputs[output].name;
  const std::string suffix = "_out";
  if (name.size() <= suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
    return -1;
  }
  const std::string base = name.substr(0, name.size() - suffix.size());
  if (base == "length") return -1;
  for (int i = 0; i < op.num_inputs; ++i) {
    if (base == op.inputs[i].name) return i;
  }
  return -1;
}

}  // namespace trt_rules
}  // namespace ham
