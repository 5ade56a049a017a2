#!/usr/bin/env bash
# The test suite: install with the dev, ONNX, plot, TVM, Triton and TensorRT-tooling extras, build the ONNX Runtime and
# libtorch op libraries, lint (ruff for Python, clang-format for C++), run every test. (The TensorRT plugin library
# needs TensorRT's headers, which no package here carries: its tests build it where TENSORRT_INCLUDE_DIR names them.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh dev onnx plot tvm triton trt
bash scripts/build-ort-ops.sh
bash scripts/build-torch-ops.sh
.venv/bin/ruff check .
mapfile -t cpp < <(find runtimes examples plugins_trt tests -type f \( -name '*.cc' -o -name '*.h' -o -name '*.cu' \) | sort)
.venv/bin/clang-format --dry-run --Werror "${cpp[@]}"
.venv/bin/python -m pytest "$@"
