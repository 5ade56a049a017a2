#!/usr/bin/env bash
# The test suite: install with the dev extras, lint, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh dev
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
