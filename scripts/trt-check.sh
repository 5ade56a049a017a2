#!/usr/bin/env bash
# The TensorRT checks, for a machine with a CUDA GPU and TensorRT (its Python wheel; trtexec on PATH and
# TENSORRT_ROOT for the C++ parts), under 10 minutes: each plugin mode's engines from the bundled model, `ham-export
# check` at the model's thresholds, -1 and 3, the C++ app against eager tokens, decode timed by trtexec, the engine
# inspector's layers, and an answer to each open question of shared/notes/tensorrt.md section 8. Writes
# build/trt-check/report.md (printed) and report.json; exit 1 when a check failed.
#
#   TENSORRT_ROOT=/opt/tensorrt bash scripts/trt-check.sh     # uses .venv/bin/python when present, else python3
#
# It runs from the source tree (scripts/source-tree.sh); that Python needs torch, triton, onnx, onnxscript,
# onnx-graphsurgeon, click, rich, safetensors and tensorrt.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${HAM_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$python" - <<'PY'
import sys
try:
    import tensorrt, torch
except ImportError as e:
    sys.exit(f"trt-check: {e.name} is not installed here")
if not torch.cuda.is_available():
    sys.exit("trt-check: no CUDA GPU is visible to torch")
PY
source scripts/source-tree.sh
timeout 600 "$python" scripts/trt_check.py
