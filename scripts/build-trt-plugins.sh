#!/usr/bin/env bash
# Build the TensorRT plugin library of the HAM ops (IPluginV3, namespace ham_cpp): build/trt-plugins/libham_trt_plugins.so,
# copied to ham_export/lib/.
#
# Needs TensorRT's headers (NvInfer.h), named by TENSORRT_INCLUDE_DIR or found under TENSORRT_ROOT/include (NVIDIA's
# TensorRT package; the include/ folder of github.com/NVIDIA/TensorRT at the release tag also serves, the library
# does not link libnvinfer), and the CUDA toolkit (nvcc). HAM_TRT_CUDA_ARCHITECTURES picks the GPUs (default 90;
# "87;89;90" for Orin, Ada and Hopper). Extra arguments go to CMake's configure step. Exits 2 with one line when the
# headers or nvcc are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build=$root/build/trt-plugins

name=build-trt-plugins
include=${TENSORRT_INCLUDE_DIR:-${TENSORRT_ROOT:+$TENSORRT_ROOT/include}}
if [ -z "$include" ] || [ ! -f "$include/NvInfer.h" ]; then
    echo "build-trt-plugins: TensorRT's headers not found; set TENSORRT_INCLUDE_DIR to the folder holding NvInfer.h (or TENSORRT_ROOT)" >&2
    exit 2
fi
nvcc=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[ -x "$nvcc" ] || { echo "build-trt-plugins: nvcc not found; install the CUDA toolkit or set CUDACXX" >&2; exit 2; }
source scripts/build-common.sh

run_quiet cmake -S plugins_trt/cpp -B "$build" -DCMAKE_BUILD_TYPE=Release "-DTENSORRT_INCLUDE_DIR=$include" \
    "-DCMAKE_CUDA_COMPILER=$nvcc" "-DHAM_TRT_CUDA_ARCHITECTURES=${HAM_TRT_CUDA_ARCHITECTURES:-90}" "$@"
run_quiet cmake --build "$build" -j "${HAM_BUILD_JOBS:-2}"
[ -f "$build/libham_trt_plugins.so" ] || { echo "build-trt-plugins: the build left no $build/libham_trt_plugins.so" >&2; exit 1; }
mkdir -p ham_export/lib
cp "$build/libham_trt_plugins.so" ham_export/lib/
