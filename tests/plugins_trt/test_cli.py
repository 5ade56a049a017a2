"""``ham-export trt`` here, without TensorRT: one line and exit 2, or with ``--prepare-only`` a folder a TensorRT
machine can build from (rewritten ONNX, PTX, the manifest draft, build_engines.sh); ``memory --artifact`` on a
TensorRT artifact; and ``check --save-polygraphy``, whose files Polygraphy compares an ONNX artifact with."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ham_export.backends import read_manifest
from ham_export.plugins_trt.engine import DRAFT, tensorrt_version

from .conftest import CAPACITY, cli

no_tensorrt = pytest.mark.skipif(tensorrt_version() is not None, reason="TensorRT is installed here")


@no_tensorrt
def test_without_tensorrt_trt_exits_2_with_one_line_and_writes_nothing(small_checkpoint, tmp_path):
    out = tmp_path / "engines"
    proc = cli("trt", small_checkpoint, "-o", out)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: TensorRT is not installed: pip install tensorrt")
    assert "--prepare-only" in proc.stderr and not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (("--plugins", "none"), "--plugins none is not offered"),
    (("--arch", "ninety"), "--arch must be compute capabilities"),
    (("--max-batch", "0"), "--max-batch must be at least 1"),
])
def test_bad_options_exit_2_with_one_line(small_checkpoint, tmp_path, args, message):
    proc = cli("trt", small_checkpoint, "-o", tmp_path / "x", "--prepare-only", *args)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr


@pytest.mark.parametrize("mode", ["qdp", "cpp"])
def test_prepare_only_writes_a_folder_to_build_from(prepared, mode, tmp_path):
    folder = prepared[mode]
    assert {p.name for p in folder.iterdir()} >= {"prefill.trt.onnx", "decode.trt.onnx", DRAFT, "build_engines.sh"}
    assert not (folder / "ham_export.json").exists()  # no engines yet
    script = (folder / "build_engines.sh").read_text()
    assert os.access(folder / "build_engines.sh", os.X_OK) and "python -m ham_export.plugins_trt.engine ." in script
    draft = json.loads((folder / DRAFT).read_text())
    info = draft["tensorrt"]
    assert info["state"] == "prepared" and info["plugins"] == mode and info["max_batch"] == 4
    assert info["profiles"]["prefill"]["tokens"] == ["1x1", "4x16", "4x64"]
    assert info["profiles"]["decode"]["past.0.k_cache"][2] == f"4x2x{CAPACITY}x8"
    assert info["aliased"]["decode"]["present.1.v_cache"] == "past.1.v_cache"
    if mode == "cpp":
        assert "trtexec --onnx=decode.trt.onnx" in script and "--preview=+aliasedPluginIO1003" in script
        assert info["ptx"] is None
    else:
        launches = json.loads((folder / "ptx/launches.json").read_text())
        assert sorted(launches) == ["HamCacheAppend", "HamCacheAttention", "HamGdnPrefill"]
        for rows in launches.values():
            assert [r["target"] for r in rows] == ["sm_87", "sm_89", "sm_90a"]
            for row in rows:
                assert (folder / row["file"]).read_text().count(f".entry {row['kernel']}(") == 1
    # The draft is the manifest the finishing step writes: with the engines in place, it reads as an artifact.
    built = tmp_path / "built"
    shutil.copytree(folder, built)
    (built / DRAFT).rename(built / "ham_export.json")
    for plan in ("prefill.plan", "decode.plan"):
        (built / plan).write_bytes(b"")
    manifest = read_manifest(built)
    assert manifest.backend == "tensorrt" and manifest.capacity == CAPACITY
    assert manifest.dtype == ("fp16" if mode == "qdp" else "fp32")


def test_memory_of_a_tensorrt_artifact(prepared, small_checkpoint, tmp_path):
    """Engine scratch as the manifest records it, plus the I/O buffers at the batch asked for."""
    built = tmp_path / "built"
    shutil.copytree(prepared["cpp"], built)
    manifest = json.loads((built / DRAFT).read_text())
    engines = {"prefill": {"file": "prefill.plan", "file_bytes": 1000, "device_memory_bytes": 5 << 20},
               "decode": {"file": "decode.plan", "file_bytes": 1000, "device_memory_bytes": 1 << 20}}
    manifest["tensorrt"].update(state="built", engines=engines, version="11.1.0", gpu="test GPU")
    (built / "ham_export.json").write_text(json.dumps(manifest))
    for plan in ("prefill.plan", "decode.plan"):
        (built / plan).write_bytes(b"")
    proc = cli("memory", small_checkpoint, "--artifact", built, "--context", "64", "--thresholds", "0.5",
               "--window", "32", "--docs", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    engine = json.loads(proc.stdout)["engine"]
    assert engine["engine_scratch_bytes"] == {"prefill": 5 << 20, "decode": 1 << 20}
    assert engine["total_bytes_separate_scratch"] - engine["total_bytes_shared_scratch"] == 1 << 20
    too_big = cli("memory", small_checkpoint, "--artifact", built, "--batch", "5", "--thresholds", "0.5")
    assert too_big.returncode == 2 and "more than the engines' profile allows (4)" in too_big.stderr


def _polygraphy() -> str:
    found = shutil.which("polygraphy") or str(Path(sys.executable).parent / "polygraphy")
    if not Path(found).exists():
        pytest.skip("polygraphy is not installed (pip install 'ham-export[trt]')")
    return found


def test_polygraphy_compares_an_onnx_artifact_with_the_eager_files(small_checkpoint, tmp_path):
    polygraphy = _polygraphy()
    artifact, files = tmp_path / "onnx", tmp_path / "polygraphy"
    assert cli("onnx", small_checkpoint, "-o", artifact, "--ops", "standard", "--max-cache", CAPACITY).returncode == 0
    proc = cli("check", small_checkpoint, artifact, "--steps", "3", "--threshold", "0.5", "--save-polygraphy", files)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("polygraphy run ")]
    assert len(lines) == 2  # prefill and decode at the one threshold
    for line in lines:
        run = subprocess.run([polygraphy, *line.split()[1:]], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0 and "PASSED" in run.stdout + run.stderr, (run.stdout + run.stderr)[-3000:]
    # A reference that differs is caught: shift the decode logits of the saved outputs.
    from polygraphy.comparator import RunResults

    outputs = files / "tau0.5.decode.outputs.json"
    results = RunResults.load(str(outputs))
    for iteration in results["eager"]:
        iteration["logits"] = iteration["logits"] + 1.0
    results.save(str(outputs))
    decode = next(line for line in lines if ".decode." in line)
    run = subprocess.run([polygraphy, *decode.split()[1:]], capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "FAILED" in run.stdout + run.stderr
