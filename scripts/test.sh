#!/usr/bin/env bash
# The test suite: install with the dev, ONNX, plot, TVM and Triton extras, build the ONNX Runtime op library, lint, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh dev onnx plot tvm triton
bash scripts/build-ort-ops.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
