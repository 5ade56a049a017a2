#!/usr/bin/env bash
# The main job on the bundled model: install, inspect, evaluate at the model's own and two other thresholds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
export PATH="$PWD/.venv/bin:$PATH"
model=examples/models/tiny-ham.pt
ham-export inspect "$model"
ham-export eval "$model" --threshold 0 --threshold 0.3 --threshold 3
ham-export eval "$model"
