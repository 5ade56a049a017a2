#!/usr/bin/env bash
# The test suite: install with the dev, ONNX, plot, TVM and Triton extras, build the ONNX Runtime and libtorch op
# libraries, lint, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh dev onnx plot tvm triton
bash scripts/build-ort-ops.sh
bash scripts/build-torch-ops.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
