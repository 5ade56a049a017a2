"""The C++ IPluginV3 library (plugins_trt/cpp): its TensorRT-free rules (ham_trt_rules.h) equal the Python plugin
specs, checked here by compiling a small dump program; the library itself and the C++ app compile with -Wall -Werror
where TensorRT's headers are (TENSORRT_INCLUDE_DIR; the headers are in no package this machine can install, so CI
skips those two and says so)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ham_export.plugins_trt.specs import CPP_NAMESPACE, PLUGINS, first_float_input, letter_sources

ROOT = Path(__file__).resolve().parents[2]
HEADERS = os.environ.get("TENSORRT_INCLUDE_DIR") or (os.environ.get("TENSORRT_ROOT", "") + "/include")
NO_HEADERS = ("TensorRT's headers are not here (no package this machine can install has them; github.com/NVIDIA/"
              "TensorRT's include/ has): set TENSORRT_INCLUDE_DIR to build the plugin library")
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"


@pytest.fixture(scope="module")
def rules(tmp_path_factory) -> dict:
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("rules") / "rules_dump"
    build = subprocess.run([compiler, "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'plugins_trt/cpp'}",
                            f"-I{ROOT / 'runtimes/common'}", str(Path(__file__).parent / "rules_dump.cc"), "-o",
                            str(exe)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    return json.loads(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout)


def test_the_cpp_rules_equal_the_plugin_specs(rules):
    assert rules["namespace"] == CPP_NAMESPACE and rules["version"] == "1"
    assert sorted(rules["ops"]) == sorted(PLUGINS)
    for op, plugin in PLUGINS.items():
        got = rules["ops"][op]
        assert got["name"] == plugin.name
        assert got["inputs"] == list(plugin.input_dtypes) and got["outputs"] == list(plugin.output_dtypes)
        assert got["aliases"] == [plugin.aliases.get(i, -1) for i in range(len(plugin.op.outputs))]
        assert got["first_float"] == first_float_input(plugin)
        assert {k: tuple(v) for k, v in got["sources"].items()} == letter_sources(plugin)


needs_headers = pytest.mark.skipif(not Path(HEADERS, "NvInfer.h").is_file(), reason=NO_HEADERS)


@needs_headers
def test_the_plugin_library_builds_and_exports_only_its_entry_points(tmp_path):
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("nvcc is not installed")
    build = subprocess.run(["bash", str(ROOT / "scripts/build-trt-plugins.sh")], cwd=ROOT, capture_output=True,
                           text=True, timeout=900, env={**os.environ, "TENSORRT_INCLUDE_DIR": HEADERS})
    assert build.returncode == 0, build.stderr[-3000:]
    library = ROOT / "build/trt-plugins/libham_trt_plugins.so"
    exported = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True).stdout
    names = {line.split()[-1] for line in exported.splitlines() if " T " in line}
    assert names == {"getCreators", "setLoggerFinder"}
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(library)], capture_output=True, text=True).stdout
    assert "nvinfer" not in undefined.lower()  # the plugins need no libnvinfer to load


@needs_headers
def test_the_cpp_app_compiles(tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++")
    proc = subprocess.run([compiler, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-isystem", HEADERS,
                           "-isystem", str(CUDA_INCLUDE), f"-I{ROOT / 'examples/cpp'}",
                           str(ROOT / "examples/cpp/trt_greedy.cc")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
