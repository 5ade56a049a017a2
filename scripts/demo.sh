#!/usr/bin/env bash
# The main job on the bundled model: install, build the ONNX Runtime op library, export to ONNX with the custom ops
# and with the opset-27 standard ops, and to an AOTInductor package, check each export against eager PyTorch (prefill
# + 64 decode steps at 3 thresholds), report memory at each threshold against a 4 MiB budget, time decode and prefill
# of both ONNX exports with the caches filled as at 1024 tokens, and evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh onnx plot
bash scripts/build-ort-ops.sh
export PATH="$PWD/.venv/bin:$PATH"
model=examples/models/tiny-ham.pt
ham-export inspect "$model"
for ops in custom standard; do
    ham-export onnx "$model" -o "build/onnx-$ops" --ops "$ops" --max-cache 1024
    ham-export check "$model" "build/onnx-$ops" --steps 64
done
ham-export native "$model" -o build/native/model.pt2 --max-cache 1024
ham-export check "$model" build/native/model.pt2 --steps 64
ham-export memory "$model" --context 8192 --sweep --budget 4MiB --plot build/memory.png
ham-export bench build/onnx-custom build/onnx-standard --context 1024 --fill -1 --fill own --fill 3 --model "$model" \
    --iterations 40 --prompt 256
ham-export eval "$model" --threshold -1 --threshold 0.2 --threshold 0.4 --threshold 3
ham-export eval "$model"
