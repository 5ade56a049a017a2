"""The engine-building helpers that need no TensorRT: profiles from the manifest, trtexec's shape flags, the
version rules of the plugin modes, and a clear stop where TensorRT is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ham_export.plugins_trt import engine

ROWS = [{"name": "token", "shape": ["B"]}, {"name": "thresholds", "shape": [2]},
        {"name": "past.0.k_cache", "shape": ["B", 2, 12, 8]}]


def test_profiles_span_batch_and_prompt_and_keep_fixed_dims():
    shapes = engine.profiles(ROWS, max_batch=4, max_prompt=64)
    assert shapes == {"token": ((1,), (4,), (4,)), "past.0.k_cache": ((1, 2, 12, 8), (4, 2, 12, 8), (4, 2, 12, 8))}
    prompt = engine.profiles([{"name": "tokens", "shape": ["B", "T"]}], 2, 64, opt_batch=1)
    assert prompt == {"tokens": ((1, 1), (1, 16), (2, 64))}
    assert engine.parse_profile(engine.profile_strings(shapes)) == shapes
    with pytest.raises(engine.EngineError, match="no profile for dimension 'S'"):
        engine.profiles([{"name": "x", "shape": ["S"]}], 1, 1)


def test_trtexec_shape_flags():
    flags = engine.trtexec_shapes(engine.profiles(ROWS, 4, 64))
    assert flags == ["--minShapes=token:1,past.0.k_cache:1x2x12x8", "--optShapes=token:4,past.0.k_cache:4x2x12x8",
                     "--maxShapes=token:4,past.0.k_cache:4x2x12x8"]


@pytest.mark.parametrize(("version", "plugins", "ok"), [
    ("10.8.0.43", "qdp", False), ("10.9.0.34", "qdp", True), ("10.14.1.48", "qdp", False),
    ("10.15.1.29", "qdp", True), ("11.1.0.106", "qdp", True), ("10.8.0.43", "cpp", True),
    ("10.14.1.48", "cpp", True)])
def test_which_tensorrt_builds_which_plugins(version, plugins, ok):
    if ok:
        engine.check_version(version, plugins)
    else:
        with pytest.raises(engine.EngineError, match="use --plugins cpp"):
            engine.check_version(version, plugins)


@pytest.mark.skipif(engine.tensorrt_version() is not None, reason="TensorRT is installed here")
def test_finishing_a_prepared_folder_without_tensorrt_stops_with_one_line(prepared):
    proc = subprocess.run([sys.executable, "-m", "ham_export.plugins_trt.engine", str(prepared["cpp"])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: TensorRT is not installed")


def test_finishing_a_folder_that_was_not_prepared_says_so(tmp_path):
    with pytest.raises(engine.EngineError, match=r"holds no ham_export\.draft\.json"):
        engine.finish(tmp_path)
