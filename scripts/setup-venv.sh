#!/usr/bin/env bash
# Create .venv (if missing) and install ham-export into it with the extras named as arguments.
# torch is installed first at the version this project is measured with: a CPU wheel that pip finds locally.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
extras=$(IFS=,; echo "$*")
.venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
