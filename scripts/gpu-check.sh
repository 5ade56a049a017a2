#!/usr/bin/env bash
# The GPU checks, for a machine with a CUDA GPU (torch, triton and pytest installed; no network needed): the
# gpu-marked tests (compiled Triton kernels against the reference, the TensorRT plugins' entry kernels launched by
# Triton, the ham ops' CUDA registrations, the ONNX Runtime CUDA kernels where onnxruntime-gpu exists), then the
# decode benchmark of one layer's kernels, whose Markdown table goes to stdout and whose rows go to
# build/gpu-bench.json, then `ham-export bench` of the bundled model on the Triton path at 16K context (every token,
# its own thresholds, none cached), whose rows go to build/gpu-bench-model.json.
#
#   bash scripts/gpu-check.sh            # uses .venv/bin/python when present, else python3
#
# It runs from the source tree (scripts/source-tree.sh), so that no pip install is needed on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${HAM_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$python" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu-check: no CUDA GPU is visible to torch")
print("gpu-check:", torch.cuda.get_device_name(), "torch", torch.__version__, file=sys.stderr)
PY
source scripts/source-tree.sh
"$python" -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/ops tests/plugins_trt
"$python" -m ham_export.kernels.bench --json build/gpu-bench.json "$@"
"$python" -m ham_export.cli triton examples/models/tiny-ham.pt -o build/gpu-triton --max-cache 16384
"$python" -m ham_export.cli bench build/gpu-triton --context 16384 --fill -1 --fill own --fill 3 \
    --model examples/models/tiny-ham.pt --batch 1 --batch 8 --json build/gpu-bench-model.json --markdown
