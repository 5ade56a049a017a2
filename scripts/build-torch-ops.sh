#!/usr/bin/env bash
# Build the libtorch custom-op library of the HAM ops: build/libtorch/libham_torch_ops.so.
#
# Against the torch wheel of .venv (its headers, libraries and CMake files; HAM_PYTHON names another Python with
# torch). Extra arguments go to CMake's configure step. Quiet on success; quick when already built. Needs cmake and
# a C++17 compiler (installed with apt as root when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${HAM_PYTHON:-$root/.venv/bin/python}
build=$root/build/libtorch

name=build-torch-ops
source scripts/build-common.sh
[ -x "$python" ] || { echo "build-torch-ops: no Python at $python; run bash scripts/setup-venv.sh" >&2; exit 1; }

if [ ! -f "$build/CMakeCache.txt" ] || [ "$#" -gt 0 ]; then
    run_quiet cmake -S runtimes/libtorch -B "$build" -DCMAKE_BUILD_TYPE=Release "-DPython_EXECUTABLE=$python" "$@"
fi
run_quiet cmake --build "$build" -j "${HAM_BUILD_JOBS:-2}"
[ -f "$build/libham_torch_ops.so" ] || { echo "build-torch-ops: the build left no $build/libham_torch_ops.so" >&2; exit 1; }
# Next to the package, where ham_export.ops.libraries finds it (and a wheel built after this carries it).
mkdir -p ham_export/lib
cp "$build/libham_torch_ops.so" ham_export/lib/
