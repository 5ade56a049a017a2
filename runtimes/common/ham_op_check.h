// The input checks of the HAM ops, made from their specs (ham_op_spec.h, generated from ham_export/ops/spec.py),
// for every C++ library: the ONNX Runtime ops, the libtorch ops, the TensorRT plugins. The preconditions and the
// messages are those of ham_export.ops.spec.OpSpec.check:
//   1. every input has the rank of its letters, and each letter one size (bound where it is first seen);
//   2. every size is at least spec::kMinSize;
//   3. the float inputs share one dtype (one the library has kernels for); the others are int64 or bool;
//   4. each Bound holds on the values (0 <= length <= C);
//   5. each attribute is one of its choices.
// A failure throws CheckError (a std::invalid_argument) before anything is read or written.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ham_op_spec.h"

namespace ham {

class CheckError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

class OpCheck {
 public:
  // who: the op's name in messages ("CacheAttention", "ham::cache_attention"); float_dtypes: the float dtype names
  // ("float32", "float16", "bfloat16") the library has kernels for.
  OpCheck(const spec::Op& op, std::string who, std::initializer_list<const char*> float_dtypes)
      : op_(op), who_(std::move(who)), float_dtypes_(float_dtypes.begin(), float_dtypes.end()) {}

  // Input i of the spec, with its dtype name ("float32", "int64", "bool", ...) and shape.
  void Input(int i, const std::string& dtype, const std::vector<int64_t>& shape) {
    const spec::Arg& arg = op_.inputs[i];
    const std::string where = who_ + ": input '" + arg.name + "'";
    if (arg.kind == spec::Kind::kFloat) {
      if (float_name_.empty()) {
        bool known = false;
        for (const std::string& name : float_dtypes_) known = known || name == dtype;
        if (!known) Fail(where + " is " + dtype + "; the float inputs must be " + Join(float_dtypes_, " or "));
        float_dtype_ = dtype;
        float_name_ = arg.name;
      } else if (dtype != float_dtype_) {
        Fail(where + " is " + dtype + ", expected " + float_dtype_ + " like input '" + float_name_ + "'");
      }
    } else {
      const std::string expected = arg.kind == spec::Kind::kInt64 ? "int64" : bool_dtype_;
      if (dtype != expected) Fail(where + " is " + dtype + ", expected " + expected);
    }
    const std::string letters = arg.letters;
    if (shape.size() != letters.size()) {
      Fail(where + " has shape " + Shape(shape) + " (rank " + std::to_string(shape.size()) + "), expected rank " +
           std::to_string(letters.size()) + ": " + Letters(letters));
    }
    for (size_t d = 0; d < letters.size(); ++d) {
      Dim& dim = dims_[Index(letters[d])];
      if (dim.from.empty()) {
        if (shape[d] < spec::kMinSize) {
          Fail(where + " has shape " + Shape(shape) + ": " + letters[d] + " must be at least " +
               std::to_string(spec::kMinSize));
        }
        dim.size = shape[d];
        dim.from = arg.name;
      } else if (dim.size != shape[d]) {
        Fail(where + " has shape " + Shape(shape) + ", expected " + Letters(letters) + " with " + letters[d] + " = " +
             std::to_string(dim.size) + " (from input '" + dim.from + "')");
      }
    }
  }

  // The dtype that stands for a bool input: "bool", or "int32" for the TensorRT plugins (no bool plugin I/O).
  void BoolAs(std::string dtype) { bool_dtype_ = std::move(dtype); }

  // The size of a shape letter, once an input that has it was checked.
  int64_t operator[](char letter) const { return dims_[Index(letter)].size; }

  // The bounds on input i's values (host memory, one per batch row).
  void Values(int i, const int64_t* values, int64_t count) const {
    for (int b = 0; b < op_.num_bounds; ++b) {
      const spec::Bound& bound = op_.bounds[b];
      if (bound.input != i) continue;
      const int64_t high = (*this)[bound.high];
      for (int64_t row = 0; row < count; ++row) {
        if (values[row] < bound.low || values[row] > high) {
          Fail(who_ + ": input '" + op_.inputs[i].name + "' holds " + std::to_string(values[row]) + " at batch " +
               std::to_string(row) + ", outside [" + std::to_string(bound.low) + ", " + bound.high + "] with " +
               bound.high + " = " + std::to_string(high));
        }
      }
    }
  }

  // Attribute a's value (nullptr: missing) -> its index among the choices.
  int Attribute(int a, const char* value) const {
    const spec::Attr& attr = op_.attributes[a];
    std::vector<std::string> choices;
    for (int c = 0; c < attr.num_choices; ++c) {
      if (value != nullptr && std::string(value) == attr.choices[c]) return c;
      choices.push_back(std::string("'") + attr.choices[c] + "'");
    }
    Fail(who_ + ": attribute '" + attr.name + "' is " + (value ? std::string("'") + value + "'" : "missing") +
         "; it must be " + Join(choices, " or "));
  }

  const std::string& who() const { return who_; }

 private:
  struct Dim {
    int64_t size = 0;
    std::string from;
  };

  [[noreturn]] static void Fail(const std::string& message) { throw CheckError(message); }
  static size_t Index(char letter) { return static_cast<unsigned char>(letter) % 32; }
  static std::string Join(const std::vector<std::string>& parts, const char* sep) {
    std::string out;
    for (size_t i = 0; i < parts.size(); ++i) (out += (i ? sep : "")) += parts[i];
    return out;
  }
  static std::string Letters(const std::string& letters) {
    std::string out = "[";
    for (size_t i = 0; i < letters.size(); ++i) (out += (i ? ", " : "")) += letters[i];
    return out + "]";
  }
  static std::string Shape(const std::vector<int64_t>& shape) {
    std::string out = "[";
    for (size_t i = 0; i < shape.size(); ++i) (out += (i ? ", " : "")) += std::to_string(shape[i]);
    return out + "]";
  }

  const spec::Op& op_;
  std::string who_;
  std::vector<std::string> float_dtypes_;
  std::string float_dtype_;
  std::string float_name_;
  std::string bool_dtype_ = "bool";
  Dim dims_[32];
};

}  // namespace ham
