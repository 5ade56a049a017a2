"""One fixture entry per registered backend: how the parity suite builds its artifacts.

:data:`VARIANTS` maps each backend of :func:`ham_export.backends.registry` to the artifacts the suite builds for it
(a variant id, the builder's own options, and the file name when the artifact is a package). A backend missing here
fails ``test_every_backend_has_a_fixture_entry``: adding a backend is its module, its registration, and one entry
here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ham_export.backends import Runner, load_runner, registry
from ham_export.backends.eager import EagerRunner
from ham_export.check.prompts import default_prompts
from ham_export.check.thresholds import threshold_in_gap
from ham_export.core import checkpoint

from ..conftest import make_saturated_model, make_small_model

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "examples" / "models" / "tiny-ham.pt"

VARIANTS: dict[str, list[tuple[str, dict, str | None]]] = {
    "torch.export": [("torch.export", {}, None)],
    "onnxruntime": [("onnx-custom", {"ops": "custom"}, None), ("onnx-standard", {"ops": "standard"}, None),
                    ("onnx-portable", {"ops": "portable"}, None)],
    "aotinductor": [("aotinductor", {}, "model.pt2")],
    "tvm": [("tvm", {}, None)],
    "triton": [("triton", {}, None)],
    "tensorrt": [("tensorrt-qdp", {"plugins": "qdp", "dtype": "fp32"}, None),
                 ("tensorrt-cpp", {"plugins": "cpp", "dtype": "fp32"}, None)],
}
"""backend -> [(variant id, builder options, package file name or None for a folder)]"""

SMALL_CAPACITY = 12  # the prompt (16 bytes) and the decode steps overflow it: the policies apply
SMALL_STEPS = 8
SMALL_SETTINGS = [("cosine", "drop"), ("learned", "evict"), ("saturated", "evict")]
"""Both policies, both routers, and evictions among saturated scores (exact and 1-ulp ties: the eviction grid)."""


def variants() -> list[tuple[str, str, dict, str | None]]:
    """(backend, variant id, options, file) for every registered backend."""
    return [(backend, *variant) for backend in registry() for variant in VARIANTS.get(backend, [])]


def requires(backend: str) -> None:
    """Skip, with the backend's own reason, where it cannot run here."""
    reason = registry()[backend].requires()
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    if backend == "onnxruntime":
        from ham_export.ops.libraries import ORT

        if not ORT.path().is_file():
            pytest.skip(f"the ONNX Runtime op library is not built at {ORT.path()} ({ORT.build})")


def build(backend: str, options: dict, file: str | None, model, folder: Path, capacity: int, policy: str,
          source=None) -> Path:
    out = folder / file if file else folder
    return registry()[backend].build(model, out, capacity=capacity, policy=policy, source=source, **options)


def open_runner(path: Path) -> Runner:
    """The artifact's runner, opened; a Triton artifact runs on the CPU under the interpreter here."""
    from ham_export.backends.triton import TritonRunner

    runner = load_runner(path)
    if isinstance(runner, TritonRunner) and not torch.cuda.is_available():
        runner = TritonRunner(runner.manifest, device="cpu")
    return runner.open()


def small_prompts() -> torch.Tensor:
    return default_prompts()[:, :16]


@pytest.fixture(scope="session")
def small_models():
    return {"cosine": make_small_model("cosine"), "learned": make_small_model("learned"),
            "saturated": make_saturated_model()}


@pytest.fixture(scope="session")
def gap_thresholds(small_models):
    """Per (router, policy): a threshold no score of the eager run lands near (so that no route can near-flip)."""
    cache = {}

    def get(router: str, policy: str) -> float:
        if (router, policy) not in cache:
            eager = EagerRunner(small_models[router], SMALL_CAPACITY, policy)
            cache[router, policy] = threshold_in_gap(eager, small_prompts(), SMALL_STEPS)
        return cache[router, policy]
    return get


@pytest.fixture(scope="session")
def bundled():
    return checkpoint.load(BUNDLED).model
