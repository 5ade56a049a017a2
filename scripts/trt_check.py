"""The TensorRT checks (run by scripts/trt-check.sh on a machine with a CUDA GPU and TensorRT).

For each plugin mode that can be built here (qdp: TensorRT 10.9+, not 10.14; cpp: the plugin library, built when
TensorRT's headers are found), from the bundled model: build the engines, ``ham-export check`` at the model's own
thresholds, -1 and 3, read what the decode engine says of its aliases and device memory, list the engine inspector's
layers, time decode with trtexec (a real state from a prefill, loaded with --loadInputs), and run the C++ app
against eager greedy tokens. Then answer each open question of section 8 of shared/notes/tensorrt.md with what was
seen. Writes build/trt-check/report.md and report.json; exit 1 if a check failed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "trt-check"
MODEL = ROOT / "examples" / "models" / "tiny-ham.pt"
CAPACITY = 128
PROMPT = "def greedy(tokens):"
STEPS = 24


def run(command: list[str], timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    print("$", " ".join(str(c) for c in command), file=sys.stderr)
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def ham_export(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "ham_export.cli", *args], timeout, env)


def versions() -> dict:
    import tensorrt as trt
    import torch

    info = {"tensorrt": trt.__version__, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
            "compute_capability": "{}{}".format(*torch.cuda.get_device_capability())}
    try:
        import tensorrt.plugin as trtp

        info["qdp_aot_impl"] = hasattr(trtp, "aot_impl")
    except ImportError:
        info["qdp_aot_impl"] = False
    smi = run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if shutil.which("nvidia-smi") \
        else None
    info["driver"] = smi.stdout.strip() if smi is not None and smi.returncode == 0 else "unknown"
    import triton

    info["triton"] = triton.__version__
    return info


def inspect_engine(plan: Path, plugins: str) -> dict:
    """Aliases, device memory and the inspector's layer list of one engine."""
    import tensorrt as trt

    from ham_export.ops.libraries import TRT

    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    if plugins == "cpp":
        runtime.get_plugin_registry().load_library(str(TRT.require()))
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    aliased = {n: engine.get_aliased_input_tensor(n) for n in outputs} \
        if hasattr(engine, "get_aliased_input_tensor") else "get_aliased_input_tensor missing (TensorRT < 10.15)"
    layers = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    rows = [layer if isinstance(layer, str) else layer.get("Name", str(layer)) for layer in layers.get("Layers", [])]
    copies = [r for r in rows if re.search(r"copy|reformat|cast", r, re.IGNORECASE)]
    return {"device_memory_bytes": int(engine.device_memory_size_v2), "aliased": aliased, "layers": rows,
            "copy_like_layers": copies}


def eager_tokens() -> list[int]:
    import torch

    from ham_export.backends.eager import EagerRunner
    from ham_export.core import checkpoint

    model = checkpoint.load(MODEL).model
    runner = EagerRunner(model, CAPACITY, "drop")
    tau = torch.tensor(model.cfg.thresholds)
    out, state = runner.prefill(torch.tensor([list(PROMPT.encode())]), tau)
    token, picked = int(out.logits[0, -1].argmax()), []
    for step in range(STEPS):
        picked.append(token)
        if step + 1 == STEPS:
            break
        out, state = runner.step(torch.tensor([token]), tau, state)
        token = int(out.logits[0].argmax())
    return picked


def decode_inputs(folder: Path) -> list[str]:
    """A real decode feed (the state after a prefill on the GPU), one raw file per input, as trtexec --loadInputs."""
    import torch

    from ham_export.backends import load_runner
    from ham_export.backends.programs import state_names

    feeds = folder / "trtexec-inputs"
    feeds.mkdir(exist_ok=True)
    with load_runner(folder) as runner:
        tau = torch.tensor(runner.manifest.thresholds)
        out, state = runner.prefill(torch.tensor([list(PROMPT.encode())]), tau)
        values = {"token": torch.tensor([int(out.logits[0, -1].argmax())]), "thresholds": tau,
                  **dict(zip(state_names(runner.n_layers, "past"), runner.state_tensors(state), strict=True))}
    flags = []
    for name, value in values.items():
        path = feeds / f"{name}.bin"
        path.write_bytes(value.contiguous().numpy().tobytes())
        flags.append(f"{name}:{path}")
    return flags


def trtexec_decode(folder: Path, plugins: str) -> dict:
    from ham_export.ops.libraries import TRT

    trtexec = shutil.which("trtexec")
    if trtexec is None:
        return {"ran": False, "why": "trtexec is not on PATH"}
    manifest = json.loads((folder / "ham_export.json").read_text())
    shapes = {n: s[0] for n, s in manifest["tensorrt"]["profiles"]["decode"].items()}  # batch 1
    command = [trtexec, f"--loadEngine={folder / 'decode.plan'}",
               "--shapes=" + ",".join(f"{n}:{s}" for n, s in shapes.items()),
               "--loadInputs=" + ",".join(decode_inputs(folder)), "--iterations=200", "--warmUp=200"]
    if plugins == "cpp":
        command.append(f"--dynamicPlugins={TRT.require()}")
    proc = run(command, timeout=300)
    text = proc.stdout + proc.stderr
    compute = re.search(r"GPU Compute Time: min = ([\d.]+) ms, max = ([\d.]+) ms, mean = ([\d.]+) ms, "
                        r"median = ([\d.]+) ms", text)
    return {"ran": True, "passed": "&&&& PASSED" in text, "cuda_graph_default": "--noCudaGraph" not in command,
            "gpu_compute_ms": None if compute is None else {"min": float(compute[1]), "mean": float(compute[3]),
                                                            "median": float(compute[4])},
            "tail": text[-1500:]}


def cpp_app(folder: Path, plugins: str, expected: list[int]) -> dict:
    from ham_export.ops.libraries import TRT

    root = os.environ.get("TENSORRT_ROOT")
    if not root:
        return {"ran": False, "why": "TENSORRT_ROOT is not set (include/ and lib/ of TensorRT)"}
    build = OUT / "cpp"
    configure = run(["cmake", "-S", ROOT / "examples/cpp/trt", "-B", build, f"-DTENSORRT_ROOT={root}"], 300)
    made = run(["cmake", "--build", build, "-j", "4"], 600) if configure.returncode == 0 else configure
    if made.returncode != 0:
        return {"ran": False, "why": "build failed", "log": (made.stdout + made.stderr)[-2000:]}
    command = [build / "trt_greedy"]
    if plugins == "cpp":
        command += ["--plugins", TRT.require()]
    proc = run([*command, folder, PROMPT, str(STEPS)], 300)
    got = [int(t) for t in proc.stdout.split()] if proc.returncode == 0 else None
    return {"ran": True, "rc": proc.returncode, "tokens": got, "eager": expected, "equal": got == expected,
            "stderr": proc.stderr[-800:]}


def build_mode(plugins: str, info: dict, extra_env: dict | None = None, suffix: str = "") -> dict:
    folder = OUT / f"{plugins}{suffix}"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.time()
    proc = ham_export("trt", str(MODEL), "-o", str(folder), "--plugins", plugins, "--max-cache", str(CAPACITY),
                      "--dtype", "fp16", "--max-batch", "4", "--max-prompt", "256", timeout=900, env=extra_env)
    row = {"folder": str(folder), "build_rc": proc.returncode, "build_s": round(time.time() - start, 1),
           "build_log": (proc.stdout + proc.stderr)[-3000:]}
    if proc.returncode != 0:
        return row
    manifest = json.loads((folder / "ham_export.json").read_text())
    row["engines"] = manifest["tensorrt"]["engines"]
    row["decode"] = inspect_engine(folder / "decode.plan", plugins)
    return row


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    info = versions()
    report: dict = {"versions": info, "modes": {}}
    major, minor = (int(x) for x in info["tensorrt"].split(".")[:2])
    modes = []
    if (major, minor) >= (10, 9) and (major, minor) != (10, 14) and info["qdp_aot_impl"]:
        modes.append("qdp")
    else:
        report["modes"]["qdp"] = {"skipped": f"TensorRT {info['tensorrt']} has no usable ahead-of-time QDPs"}
    include = os.environ.get("TENSORRT_INCLUDE_DIR") or (os.environ.get("TENSORRT_ROOT", "") + "/include")
    lib = run(["bash", ROOT / "scripts/build-trt-plugins.sh"], 900, {"TENSORRT_INCLUDE_DIR": include,
                                                                     "HAM_TRT_CUDA_ARCHITECTURES":
                                                                     info["compute_capability"]})
    if lib.returncode == 0:
        modes.append("cpp")
    else:
        report["modes"]["cpp"] = {"skipped": "the plugin library did not build: " + (lib.stderr or lib.stdout)[-500:]}
    expected = eager_tokens()
    failed = False
    for plugins in modes:
        row = build_mode(plugins, info)
        report["modes"][plugins] = row
        if row["build_rc"] != 0:
            failed = True
            continue
        check = ham_export("check", str(MODEL), row["folder"], "--json", timeout=600)
        row["check"] = json.loads(check.stdout) if check.stdout.strip().startswith("{") else {
            "error": (check.stdout + check.stderr)[-2000:]}
        failed |= check.returncode != 0
        row["trtexec"] = trtexec_decode(Path(row["folder"]), plugins)
        row["cpp_app"] = cpp_app(Path(row["folder"]), plugins, expected)
        failed |= row["cpp_app"].get("ran", False) and not row["cpp_app"].get("equal")
    if "cpp" in modes and report["modes"]["cpp"].get("build_rc") == 0:
        unaliased = build_mode("cpp", info, {"HAM_TRT_NO_ALIAS": "1"}, "-noalias")
        report["modes"]["cpp-noalias"] = {k: unaliased.get(k) for k in ("build_rc", "engines", "decode")}
    report["answers"] = answers(report)
    (OUT / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (OUT / "report.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if failed else 0


def answers(report: dict) -> dict[str, str]:
    """Section 8 of shared/notes/tensorrt.md, question by question, from what was seen."""
    info, modes = report["versions"], report["modes"]
    qdp, cpp = modes.get("qdp", {}), modes.get("cpp", {})

    def check_text(row: dict) -> str:
        check = row.get("check") or {}
        if "passed" not in check:
            return f"no check result ({row.get('skipped') or row.get('build_log', '')[-300:]})"
        return (f"check {'passed' if check['passed'] else 'FAILED'} (max |logit err| {check['max_abs_err']:.2e}, "
                f"max state err {check['max_state_err']:.2e})")

    def aliases(row: dict) -> str:
        decode = row.get("decode") or {}
        return (f"decode engine aliases {decode.get('aliased')}; device memory "
                f"{decode.get('device_memory_bytes')} B; copy-like layers {decode.get('copy_like_layers')}")

    noalias = (modes.get("cpp-noalias") or {}).get("decode") or {}
    ptx = sorted({p.read_text().split(".version ")[1].split()[0] for p in OUT.glob("*/ptx/*.ptx")}) or ["not written"]
    return {
        "1 QDP AOT with a Triton >= 3.3 kernel (hidden scratch params)": check_text(qdp),
        "2 aliased outputs, one pointer": f"qdp: {aliases(qdp)}; cpp: {aliases(cpp)}; cpp without the alias: "
                                          f"device memory {noalias.get('device_memory_bytes')} B",
        "3 trtexec --loadEngine with --loadInputs, CUDA graph": json.dumps(
            {m: {k: (modes[m].get("trtexec") or {}).get(k) for k in ("passed", "gpu_compute_ms")}
             for m in ("qdp", "cpp") if m in modes}),
        "4 PTX ISA against the driver": f"driver {info['driver']}, Triton {info['triton']}, PTX ISA {ptx}; the QDP "
                                        f"build {'ran' if qdp.get('build_rc') == 0 else 'did not run'}",
        "5 shared memory > 48 KiB": "not exercised: plugins_trt.launch keeps every launch within 48 KiB "
                                    "(compile_fitting picks smaller blocks)",
        "6 plugin-free TensorRT 11 path": "not built (--plugins none waits for the standard-op ONNX issue)",
        "7 TensorRT version": f"{info['tensorrt']}; tensorrt.plugin.aot_impl present: {info['qdp_aot_impl']}",
    }


def markdown(report: dict) -> str:
    info = report["versions"]
    lines = [f"# TensorRT check: {info['gpu']} (sm_{info['compute_capability']}), TensorRT {info['tensorrt']}, "
             f"driver {info['driver']}", ""]
    for mode, row in report["modes"].items():
        if "skipped" in row:
            lines.append(f"- {mode}: skipped: {row['skipped']}")
            continue
        check = row.get("check") or {}
        app = row.get("cpp_app") or {}
        timing = (row.get("trtexec") or {}).get("gpu_compute_ms")
        lines.append(f"- {mode}: build rc {row.get('build_rc')} ({row.get('build_s')} s); check "
                     f"{check.get('passed')}; C++ app equal to eager: {app.get('equal', app.get('why'))}; "
                     f"trtexec decode GPU compute {timing} ms")
    lines += ["", "## Open questions (shared/notes/tensorrt.md, section 8)", ""]
    lines += [f"- {question}: {answer}" for question, answer in report["answers"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
