#!/usr/bin/env bash
# Build the ONNX Runtime custom-op library of the HAM ops: build/ort/libham_ort_ops.so.
#
# The ONNX Runtime C/C++ headers come from Debian trixie's libonnxruntime-dev (headers only; no pip wheel and no
# Debian 12 package ships them). They are fetched once into build/ort-headers/ with a private apt configuration:
# the system's apt sources and package state are left alone. Extra arguments go to CMake's configure step, e.g.
#   bash scripts/build-ort-ops.sh -DHAM_ORT_CUDA=ON
# Quiet on success; quick when already built. Needs cmake and a C++17 compiler (installed with apt as root when
# missing) and, the first time, network access to deb.debian.org.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
headers=$root/build/ort-headers
include=$headers/usr/include/onnxruntime
build=$root/build/ort

name=build-ort-ops
source scripts/build-common.sh

if [ ! -f "$include/onnxruntime_lite_custom_op.h" ]; then
    for tool in apt-get dpkg-deb; do
        command -v "$tool" >/dev/null || { echo "build-ort-ops: $tool is needed to fetch the headers" >&2; exit 1; }
    done
    apt_dir=$root/build/ort-apt
    rm -rf "$apt_dir" "$headers"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/deb"
    echo "deb http://deb.debian.org/debian trixie main" >"$apt_dir/sources.list"
    apt_opts=(
        -o "Dir::Etc::SourceList=$apt_dir/sources.list"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::State::Lists=$apt_dir/lists"
        -o "Dir::Cache=$apt_dir/cache"
        -o "Dir::State::status=/var/lib/dpkg/status"
        # apt-get download drops privileges to _apt, which cannot write into a root-owned build folder.
        -o "APT::Sandbox::User=root"
    )
    run_quiet apt-get "${apt_opts[@]}" update
    (cd "$apt_dir/deb" && run_quiet apt-get "${apt_opts[@]}" download libonnxruntime-dev)
    deb=$(find "$apt_dir/deb" -name 'libonnxruntime-dev_*.deb' | head -n 1)
    [ -n "$deb" ] || { echo "build-ort-ops: apt-get download left no libonnxruntime-dev .deb" >&2; exit 1; }
    mkdir -p "$headers"
    run_quiet dpkg-deb -x "$deb" "$headers"
    rm -rf "$apt_dir"
    if [ ! -f "$include/onnxruntime_lite_custom_op.h" ]; then
        echo "build-ort-ops: $deb holds no onnxruntime_lite_custom_op.h under usr/include/onnxruntime" >&2
        exit 1
    fi
fi

if [ ! -f "$build/CMakeCache.txt" ] || [ "$#" -gt 0 ]; then
    run_quiet cmake -S runtimes/onnxruntime -B "$build" -DCMAKE_BUILD_TYPE=Release \
        "-DORT_INCLUDE_DIR=$include" "$@"
fi
run_quiet cmake --build "$build" -j "${HAM_BUILD_JOBS:-2}"
[ -f "$build/libham_ort_ops.so" ] || { echo "build-ort-ops: the build left no $build/libham_ort_ops.so" >&2; exit 1; }
# Next to the package, where ham_export.ops.libraries finds it (and a wheel built after this carries it).
mkdir -p ham_export/lib
cp "$build/libham_ort_ops.so" ham_export/lib/
