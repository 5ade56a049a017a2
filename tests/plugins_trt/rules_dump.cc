// Prints what plugins_trt/cpp/ham_trt_rules.h makes of each op spec, as JSON, for test_cpp_rules.py to compare with
// plugins_trt/specs.py. Needs no TensorRT.
#include <cstdio>
#include <cstring>

#include "ham_trt_rules.h"

namespace {

const char* KindName(ham::trt_rules::PluginKind kind) {
  switch (kind) {
    case ham::trt_rules::PluginKind::kFloat:
      return "T";
    case ham::trt_rules::PluginKind::kInt64:
      return "int64";
    case ham::trt_rules::PluginKind::kInt32:
      return "int32";
  }
  return "?";
}

void Kinds(const ham::spec::Arg* args, int count) {
  std::printf("[");
  for (int i = 0; i < count; ++i) std::printf("%s\"%s\"", i ? ", " : "", KindName(ham::trt_rules::Kind(args[i])));
  std::printf("]");
}

}  // namespace

int main() {
  std::printf("{\"namespace\": \"%s\", \"version\": \"%s\", \"ops\": {", ham::trt_rules::kNamespace,
              ham::trt_rules::kVersion);
  bool first_op = true;
  for (const ham::spec::Op* op : ham::spec::kOps) {
    std::printf("%s\"%s\": {\"name\": \"%s\", \"inputs\": ", first_op ? "" : ", ", op->onnx_name,
                ham::trt_rules::PluginName(*op).c_str());
    first_op = false;
    Kinds(op->inputs, op->num_inputs);
    std::printf(", \"outputs\": ");
    Kinds(op->outputs, op->num_outputs);
    std::printf(", \"aliases\": [");
    for (int o = 0; o < op->num_outputs; ++o) std::printf("%s%d", o ? ", " : "", ham::trt_rules::AliasedInput(*op, o));
    std::printf("], \"first_float\": %d, \"sources\": {", ham::trt_rules::FirstFloatInput(*op));
    bool first_letter = true;
    for (const char* letter = "BHTCKV"; *letter != '\0'; ++letter) {
      const ham::trt_rules::Source s = ham::trt_rules::LetterSource(*op, *letter);
      if (s.input < 0) continue;
      std::printf("%s\"%c\": [%d, %d]", first_letter ? "" : ", ", *letter, s.input, s.dim);
      first_letter = false;
    }
    std::printf("}}");
  }
  std::printf("}}\n");
  return 0;
}
