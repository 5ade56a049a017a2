"""The op specs for C++: generates ``runtimes/common/ham_op_spec.h`` from :mod:`ham_export.ops.spec`.

The header is checked in, so that the C++ libraries build without Python; ``tests/ops/test_spec.py`` fails when it
differs from what this module generates. Regenerate it with::

    python -m ham_export.ops.cpp            # writes runtimes/common/ham_op_spec.h
    python -m ham_export.ops.cpp --check    # exit 1 if the file is stale

The ONNX Runtime and libtorch libraries (and the TensorRT plugins) take from it their op names, versions, schemas,
input and output names and order, shape letters, attributes and preconditions; ``runtimes/common/ham_op_check.h``
checks a call against it, with the same messages as :meth:`ham_export.ops.spec.OpSpec.check`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import spec as specs

HEADER = Path(__file__).resolve().parents[2] / "runtimes" / "common" / "ham_op_spec.h"
_KINDS = {"T": "Kind::kFloat", "int64": "Kind::kInt64", "bool": "Kind::kBool"}


def _const_name(name: str) -> str:
    """``k_cache`` -> ``kKCache``."""
    return "k" + "".join(part.capitalize() for part in name.split("_"))


def _string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _op(spec: specs.OpSpec) -> list[str]:
    ns = spec.torch_name
    lines = [f"// {spec.name} (ham::{spec.torch_name}, version {spec.version}): {spec.doc}"]
    if spec.refusal:
        lines.append(f"// On a device: {spec.refusal}.")
    lines += [f"namespace {ns} {{", ""]
    lines.append("enum Input { " + ", ".join(_const_name(a.name) for a in spec.inputs) + ", kNumInputs };")
    lines.append("enum Output { " + ", ".join(_const_name(a.name) for a in spec.outputs) + ", kNumOutputs };")
    lines.append("inline constexpr Arg kInputs[] = {")
    lines += [f"    {{{_string(a.name)}, {_KINDS[a.dtype]}, {_string(a.shape)}}}," for a in spec.inputs]
    lines.append("};")
    lines.append("inline constexpr Arg kOutputs[] = {")
    lines += [f"    {{{_string(a.name)}, {_KINDS[a.dtype]}, {_string(a.shape)}}}," for a in spec.outputs]
    lines.append("};")
    for attr in spec.attributes:
        prefix = _const_name(attr.name)
        lines.append(f"inline constexpr const char* {prefix}Choices[] = {{"
                     + ", ".join(_string(c) for c in attr.choices) + "};")
        lines.append(f"enum {prefix[1:]} {{ " + ", ".join(_const_name(c) for c in attr.choices) + " };")
    if spec.attributes:
        lines.append("inline constexpr Attr kAttributes[] = {")
        lines += [f"    {{{_string(a.name)}, {_const_name(a.name)}Choices, {len(a.choices)}}},"
                  for a in spec.attributes]
        lines.append("};")
    if spec.bounds:
        lines.append("inline constexpr Bound kBounds[] = {")
        lines += [f"    {{{_const_name(b.arg)}, {b.low}, '{b.high}'}},  // {b.doc}" for b in spec.bounds]
        lines.append("};")
    lines += ["", f"}}  // namespace {ns}", ""]
    inplace = spec.inplace
    fields = [
        _string(spec.name), _string(spec.torch_name), str(spec.version),
        f"{ns}::kInputs", f"{ns}::kNumInputs", f"{ns}::kOutputs", f"{ns}::kNumOutputs",
        f"{ns}::kAttributes" if spec.attributes else "nullptr", str(len(spec.attributes)),
        f"{ns}::kBounds" if spec.bounds else "nullptr", str(len(spec.bounds)),
        _string(spec.torch_schema()),
        _string(inplace.name if inplace else ""), _string(spec.inplace_schema() if inplace else ""),
    ]
    lines.append(f"inline constexpr Op {_const_name(spec.torch_name)}{{")
    lines += [f"    {field}," for field in fields[:-1]] + [f"    {fields[-1]}}};", ""]
    return lines


def generate() -> str:
    """The text of ``ham_op_spec.h``."""
    lines = [
        "// The HAM op specs for C++, generated from ham_export/ops/spec.py by `python -m ham_export.ops.cpp`.",
        "// Do not edit: tests/ops/test_spec.py fails when this file differs from what the generator writes.",
        "//",
        "// Dtype kinds: kFloat (the op's float type, one per call), kInt64, kBool. Shape letters: B batch, H heads,",
        "// T new tokens, C cache capacity, K key width, V value width; every size is at least kMinSize. A Bound says",
        "// low <= value <= size of a letter. runtimes/common/ham_op_check.h checks a call against an Op.",
        "#pragma once",
        "",
        "#include <cstdint>",
        "",
        "// Generated: one line per item, schemas and docs unbroken.",
        "// clang-format off",
        "namespace ham {",
        "namespace spec {",
        "",
        "enum class Kind { kFloat, kInt64, kBool };",
        "",
        "struct Arg {",
        "  const char* name;",
        "  Kind kind;",
        "  const char* letters;  // one shape letter per dimension",
        "};",
        "",
        "struct Attr {",
        "  const char* name;",
        "  const char* const* choices;",
        "  int num_choices;",
        "};",
        "",
        "struct Bound {  // low <= input's values <= size of letter high",
        "  int input;",
        "  int64_t low;",
        "  char high;",
        "};",
        "",
        "struct Op {",
        "  const char* onnx_name;",
        "  const char* torch_name;",
        "  int version;",
        "  const Arg* inputs;",
        "  int num_inputs;",
        "  const Arg* outputs;",
        "  int num_outputs;",
        "  const Attr* attributes;",
        "  int num_attributes;",
        "  const Bound* bounds;",
        "  int num_bounds;",
        "  const char* torch_schema;    // after the name: \"(Tensor q, ...) -> Tensor\"",
        "  const char* inplace_name;    // the in-place form, \"\" when there is none",
        "  const char* inplace_schema;  // its schema, \"\" when there is none",
        "};",
        "",
        f"inline constexpr char kOnnxDomain[] = {_string(specs.ONNX_DOMAIN)};",
        f"inline constexpr int kOnnxDomainVersion = {specs.ONNX_DOMAIN_VERSION};",
        f"inline constexpr char kTorchNamespace[] = {_string(specs.TORCH_NAMESPACE)};",
        f"inline constexpr int64_t kMinSize = {specs.MIN_SIZE};",
        f"inline constexpr int64_t kInvalidLength = {specs.INVALID_LENGTH};  // overflow of a row a device kernel "
        "refused",
        f"inline constexpr float kEvictGrid = {specs.EVICT_GRID}.0f;  // eviction key: floor(float(score) * kEvictGrid "
        "+ 0.5f)",
        "",
    ]
    for spec in specs.OPS:
        lines += _op(spec)
    lines.append("inline constexpr const Op* kOps[] = {" + ", ".join(f"&{_const_name(s.torch_name)}"
                                                                       for s in specs.OPS) + "};")
    lines += ["", "}  // namespace spec", "}  // namespace ham", "// clang-format on", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate runtimes/common/ham_op_spec.h from the op specs.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the checked-in header is stale")
    parser.add_argument("--output", type=Path, default=HEADER)
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        current = args.output.read_text() if args.output.is_file() else ""
        if current != text:
            sys.stderr.write(f"{args.output} is stale; regenerate it with python -m ham_export.ops.cpp\n")
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
