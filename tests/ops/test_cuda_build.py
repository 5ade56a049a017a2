"""The CUDA kernels (runtimes/common, as the ONNX Runtime op library builds them) compile for sm_90 (they cannot run
here: no GPU)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
HEADERS = ROOT / "build" / "ort-headers" / "usr" / "include" / "onnxruntime"


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="nvcc is not installed, so the CUDA kernels cannot be compiled")
@pytest.mark.skipif(not HEADERS.is_dir(), reason="ORT headers not fetched (bash scripts/build-ort-ops.sh)")
def test_cuda_kernels_compile_for_sm90(tmp_path):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    configure = ["cmake", "-S", str(ROOT / "runtimes" / "onnxruntime"), "-B", str(tmp_path),
                 f"-DORT_INCLUDE_DIR={HEADERS}", "-DHAM_ORT_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                 "-DHAM_ORT_CUDA_ARCHITECTURES=90"]
    for command in (configure, ["cmake", "--build", str(tmp_path), "-j", "2"]):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    library = tmp_path / "libham_ort_ops.so"
    assert library.is_file()
    symbols = subprocess.run(["nm", "-D", str(library)], capture_output=True, text=True).stdout
    assert "RegisterCustomOps" in symbols
    assert "HamOrtOpsCudaEnabled" in symbols
