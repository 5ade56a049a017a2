"""The libtorch op library (runtimes/libtorch, libham_torch_ops.so) against the reference ops.

The library defines the same ``ham`` namespace as :mod:`ham_export.ops`, which this test process has already
imported (conftest imports the model), so it is loaded in a worker subprocess that imports no ``ham_export`` at all:
the worker runs an op on pickled tensors and sends back the outputs or the error; the comparison with
:mod:`ham_export.reference` happens here. Caches are NaN past their length, so a kernel that reads there shows at
once. The library is built with ``bash scripts/build-torch-ops.sh`` (quick when already built).
"""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ham_export import reference as ref
from ham_export.opspec import CACHE_APPEND, GDN_PREFILL, OPS, TORCH_NAMESPACE

ROOT = Path(__file__).parents[1]
LIBRARY = ROOT / "build" / "libtorch" / "libham_torch_ops.so"

# Reads (op name, args) pickles from stdin and answers ("ok", outputs) or ("error", type name, message); the op
# name "_schema" asks for an op's schema string. Two intra-op threads exercise the kernels' at::parallel_for.
WORKER = r"""
import pickle, sys
import torch
torch.ops.load_library(sys.argv[1])
torch.set_num_threads(2)
assert not any(name.startswith("ham_export") for name in sys.modules), "the worker must not import ham_export"
requests, replies = sys.stdin.buffer, sys.stdout.buffer
while True:
    try:
        name, args = pickle.load(requests)
    except EOFError:
        break
    try:
        if name == "_schema":
            reply = ("ok", str(getattr(torch.ops.ham, args[0]).default._schema))
        else:
            reply = ("ok", getattr(torch.ops.ham, name)(*args))
    except Exception as exc:
        reply = ("error", type(exc).__name__, str(exc))
    pickle.dump(reply, replies)
    replies.flush()
"""


class Worker:
    """A Python subprocess with the op library loaded: ``call(op, *args)`` runs ``torch.ops.ham.<op>`` there."""

    def __init__(self, library: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(library)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def call(self, op: str, *args):
        try:
            pickle.dump((op, args), self.proc.stdin)
            self.proc.stdin.flush()
            reply = pickle.load(self.proc.stdout)
        except (BrokenPipeError, EOFError):
            self.proc.kill()
            raise AssertionError(f"the op worker died: {self.proc.stderr.read().decode()}") from None
        if reply[0] == "error":
            _, kind, message = reply
            raise RuntimeError(message) if kind == "RuntimeError" else AssertionError(f"{kind}: {message}")
        return reply[1]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker():
    if shutil.which("cmake") is None:
        pytest.fail("cmake is needed to build runtimes/libtorch (apt-get install cmake)")
    build = subprocess.run(["bash", str(ROOT / "scripts" / "build-torch-ops.sh")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    w = Worker(LIBRARY)
    yield w
    w.close()


# ---------------------------------------------------------------------------------------------------------------
# inputs


def poison(cache: torch.Tensor, length: torch.Tensor, axis: int) -> torch.Tensor:
    """NaN in every entry at and past length along ``axis`` (the cache axis), batch first."""
    cache = cache.clone()
    for b, n in enumerate(length.tolist()):
        cache[b].narrow(axis - 1, n, cache.shape[axis] - n).fill_(float("nan"))
    return cache


def lengths(gen: torch.Generator, kind: str, b: int, c: int) -> torch.Tensor:
    if kind == "mixed":
        return torch.randint(0, c + 1, (b,), generator=gen)
    return torch.full((b,), {"empty": 0, "partial": c // 2, "full": c}[kind], dtype=torch.int64)


def attention_args(gen, b, h, t, c, dk, dv, length, routed_p=0.6, dtype=torch.float32) -> list[torch.Tensor]:
    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    return [randn(b, h, t, dk).to(dtype), poison(randn(b, h, c, dk), length, 2).to(dtype),
            poison(randn(b, h, c, dv), length, 2).to(dtype), length, randn(b, h, t, dk).to(dtype),
            randn(b, h, t, dv).to(dtype), torch.rand(b, t, generator=gen) < routed_p,
            (0.3 + 1.7 * torch.rand(h, generator=gen)).to(dtype)]


def append_args(gen, b, h, t, c, dk, dv, length, routed_p=0.6, dtype=torch.float32) -> list[torch.Tensor]:
    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    return [poison(randn(b, h, c, dk), length, 2).to(dtype), poison(randn(b, h, c, dv), length, 2).to(dtype),
            poison(torch.rand(b, c, generator=gen), length, 1).to(dtype), length, randn(b, h, t, dk).to(dtype),
            randn(b, h, t, dv).to(dtype), torch.rand(b, t, generator=gen).to(dtype),
            torch.rand(b, t, generator=gen) < routed_p]


def gdn_args(gen, b, t, h, dk, dv, dtype=torch.float32) -> list[torch.Tensor]:
    def unit(*shape):
        x = torch.randn(*shape, generator=gen)
        return x / (x * x).sum(-1, keepdim=True).add(1e-6).sqrt()

    return [unit(b, t, h, dk).to(dtype), unit(b, t, h, dk).to(dtype), torch.randn(b, t, h, dv, generator=gen).to(dtype),
            (-0.7 * torch.rand(b, t, h, generator=gen)).to(dtype), torch.rand(b, t, h, generator=gen).to(dtype),
            torch.randn(b, h, dk, dv, generator=gen).to(dtype)]


def upcast(args: list[torch.Tensor]) -> list[torch.Tensor]:
    """The reference's arguments: floats in float32."""
    return [a.float() if a.is_floating_point() else a for a in args]


# ---------------------------------------------------------------------------------------------------------------
# schemas


@pytest.mark.parametrize("spec", OPS, ids=[s.torch_name for s in OPS])
def test_schema_matches_opspec(worker, spec):
    schema = worker.call("_schema", spec.torch_name)
    assert schema == f"{TORCH_NAMESPACE}::{spec.torch_name}{spec.torch_schema()}"


# ---------------------------------------------------------------------------------------------------------------
# cache_attention


def check_attention(worker, args, dtype=torch.float32) -> torch.Tensor:
    got = worker.call("cache_attention", *args)
    expected = ref.cache_attention(*upcast(args))
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert got.dtype == dtype and got.shape == expected.shape and got.is_contiguous()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)
    return got


@pytest.mark.parametrize("kind", ["empty", "partial", "full", "mixed"])
@pytest.mark.parametrize(("b", "h", "t", "c"), [(1, 1, 1, 4), (2, 3, 1, 8), (3, 2, 5, 6), (2, 4, 9, 16)])
def test_cache_attention_matches_reference(worker, b, h, t, c, kind):
    gen = torch.Generator().manual_seed(b * 100 + t * 10 + c)
    check_attention(worker, attention_args(gen, b, h, t, c, 8, 6, lengths(gen, kind, b, c)))


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), t=st.integers(1, 6), c=st.integers(0, 7), dk=st.integers(1, 9),
       dv=st.integers(1, 9), routed_p=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_cache_attention_hypothesis(worker, b, h, t, c, dk, dv, routed_p, seed):
    gen = torch.Generator().manual_seed(seed)
    check_attention(worker, attention_args(gen, b, h, t, c, dk, dv, torch.randint(0, c + 1, (b,), generator=gen),
                                           routed_p))


def test_cache_attention_query_without_keys_is_zero(worker):
    gen = torch.Generator().manual_seed(0)
    got = check_attention(worker, attention_args(gen, 2, 2, 3, 4, 8, 5, torch.tensor([0, 2]), routed_p=0.0))
    assert (got[0] == 0).all() and not (got[1] == 0).all()


def test_cache_attention_float16(worker):
    gen = torch.Generator().manual_seed(2)
    check_attention(worker, attention_args(gen, 2, 3, 4, 8, 8, 6, torch.tensor([0, 5]), dtype=torch.float16),
                    torch.float16)


def test_cache_attention_non_contiguous_inputs(worker):
    gen = torch.Generator().manual_seed(3)
    args = attention_args(gen, 2, 3, 4, 8, 8, 6, torch.tensor([3, 8]))
    args[0] = args[0].transpose(2, 3).contiguous().transpose(2, 3)  # q with other strides, same values
    check_attention(worker, args)


# ---------------------------------------------------------------------------------------------------------------
# cache_append


def check_append(worker, args, policy, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    got = worker.call("cache_append", *args, policy)
    expected = ref.cache_append(*upcast(args), policy)
    assert len(got) == len(CACHE_APPEND.outputs)
    for arg, g, e in zip(CACHE_APPEND.outputs, got, expected, strict=True):
        # Copies and a discrete policy: exact, NaN past the new length included.
        assert g.is_contiguous(), arg.name
        torch.testing.assert_close(g, e.to(g.dtype), atol=0, rtol=0, equal_nan=True, msg=arg.name)
    return got


@pytest.mark.parametrize("policy", ["drop", "evict"])
@pytest.mark.parametrize("kind", ["empty", "partial", "full", "mixed"])
@pytest.mark.parametrize(("b", "h", "t", "c"), [(1, 1, 1, 4), (2, 3, 1, 8), (3, 2, 5, 6), (2, 2, 9, 4)])
def test_cache_append_matches_reference(worker, b, h, t, c, kind, policy):
    gen = torch.Generator().manual_seed(b * 100 + t * 10 + c)
    args = append_args(gen, b, h, t, c, 8, 6, lengths(gen, kind, b, c))
    inputs = [a.clone() for a in args]
    check_append(worker, args, policy)
    for a, i in zip(args, inputs, strict=True):  # functional: the inputs are left alone
        torch.testing.assert_close(a, i, atol=0, rtol=0, equal_nan=True)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), t=st.integers(1, 7), c=st.integers(1, 5), dk=st.integers(1, 5),
       dv=st.integers(1, 5), routed_p=st.sampled_from([0.3, 0.8, 1.0]), policy=st.sampled_from(["drop", "evict"]),
       seed=st.integers(0, 2**16))
def test_cache_append_hypothesis(worker, b, h, t, c, dk, dv, routed_p, policy, seed):
    gen = torch.Generator().manual_seed(seed)
    check_append(worker, append_args(gen, b, h, t, c, dk, dv, torch.randint(0, c + 1, (b,), generator=gen),
                                     routed_p), policy)


@pytest.mark.parametrize("policy", ["drop", "evict"])
def test_cache_append_overflow(worker, policy):
    gen = torch.Generator().manual_seed(3)
    args = append_args(gen, 2, 2, 6, 4, 3, 3, torch.tensor([3, 4]), routed_p=1.0)
    args[6] = torch.tensor([[0.1, 0.9, 0.2, 0.95, 0.3, 0.8], [0.0, 2.0, 2.0, 0.5, 3.0, 0.1]])
    _, _, score_cache, length, overflow = check_append(worker, args, policy)
    assert length.tolist() == [4, 4] and overflow.tolist() == [5, 6]
    if policy == "evict":  # the high scorers got in
        assert (score_cache[0] == 0.95).any() and (score_cache[1] == 3.0).any()


def test_cache_append_float16(worker):
    gen = torch.Generator().manual_seed(5)
    for policy in ("drop", "evict"):
        args = append_args(gen, 2, 2, 5, 4, 4, 4, torch.tensor([2, 4]), routed_p=0.9, dtype=torch.float16)
        check_append(worker, args, policy, torch.float16)


# ---------------------------------------------------------------------------------------------------------------
# gdn_prefill


def check_gdn(worker, args, dtype=torch.float32) -> None:
    got = worker.call("gdn_prefill", *args)
    recurrent = ref.gdn_recurrent(*upcast(args))
    chunked = ref.gdn_chunked(*upcast(args))
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    for arg, g, r, c in zip(GDN_PREFILL.outputs, got, recurrent, chunked, strict=True):
        assert g.dtype == dtype and g.shape == r.shape and g.is_contiguous(), arg.name
        torch.testing.assert_close(g.float(), r, atol=tol, rtol=tol, msg=arg.name)
        torch.testing.assert_close(g.float(), c, atol=max(tol, 1e-4), rtol=1e-4, msg=arg.name)


@pytest.mark.parametrize(("b", "t", "h", "dk", "dv"), [(1, 1, 1, 4, 4), (2, 1, 3, 8, 6), (2, 7, 2, 8, 8),
                                                       (3, 33, 2, 16, 8), (1, 70, 1, 5, 3)])
def test_gdn_prefill_matches_reference(worker, b, t, h, dk, dv):
    check_gdn(worker, gdn_args(torch.Generator().manual_seed(t), b, t, h, dk, dv))


def test_gdn_prefill_no_tokens_keeps_the_state(worker):
    args = gdn_args(torch.Generator().manual_seed(8), 2, 0, 2, 4, 3)
    o, vhat, state = worker.call("gdn_prefill", *args)
    assert o.shape == vhat.shape == (2, 0, 2, 3)
    torch.testing.assert_close(state, args[5], atol=0, rtol=0)


def test_gdn_prefill_float16(worker):
    check_gdn(worker, gdn_args(torch.Generator().manual_seed(9), 2, 9, 2, 8, 8, dtype=torch.float16), torch.float16)


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_bad_shapes_name_the_input_and_the_expected_shape(worker):
    gen = torch.Generator().manual_seed(10)
    args = attention_args(gen, 2, 3, 4, 6, 4, 5, torch.tensor([1, 2]))
    args[1] = args[1][..., :3]  # k_cache [2, 3, 6, 3] where K = 4
    with pytest.raises(RuntimeError, match=r"ham::cache_attention: input 'k_cache' has shape \[2, 3, 6, 3\], "
                                           r"expected \[B, H, C, K\] with K = 4 \(from input 'q'\)"):
        worker.call("cache_attention", *args)

    args = append_args(gen, 2, 3, 4, 6, 4, 5, torch.tensor([1, 2]))
    args[6] = args[6][:, None]  # score [2, 1, 4]
    with pytest.raises(RuntimeError, match=r"ham::cache_append: input 'score' has shape \[2, 1, 4\] \(rank 3\), "
                                           r"expected rank 2: \[B, T\]"):
        worker.call("cache_append", *args, "drop")

    args = gdn_args(gen, 2, 3, 2, 4, 4)
    args[5] = args[5][:1]  # state with B = 1
    with pytest.raises(RuntimeError, match=r"ham::gdn_prefill: input 'state' has shape \[1, 2, 4, 4\], "
                                           r"expected \[B, H, K, V\] with B = 2 \(from input 'q'\)"):
        worker.call("gdn_prefill", *args)


def test_bad_dtypes_lengths_and_policies_are_errors(worker):
    gen = torch.Generator().manual_seed(11)
    args = attention_args(gen, 2, 2, 1, 4, 4, 4, torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match=r"input 'length' is Int, expected Long"):
        worker.call("cache_attention", *args[:3], args[3].int(), *args[4:])
    with pytest.raises(RuntimeError, match=r"input 'v' is Half, expected Float like input 'q'"):
        worker.call("cache_attention", *args[:5], args[5].half(), *args[6:])
    with pytest.raises(RuntimeError, match=r"input 'q' is Double; the float inputs must be Float"):
        worker.call("cache_attention", args[0].double(), *args[1:])
    with pytest.raises(RuntimeError, match=r"input 'routed' is Float, expected Bool"):
        worker.call("cache_attention", *args[:6], args[6].float(), args[7])
    with pytest.raises(RuntimeError, match=r"input 'length' holds 5 at batch 1, outside \[0, C\] with cache "
                                           r"capacity C = 4"):
        worker.call("cache_attention", *args[:3], torch.tensor([1, 5]), *args[4:])

    args = append_args(gen, 2, 2, 1, 4, 4, 4, torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match=r"ham::cache_append: policy is \"keep\"; it must be \"drop\" or "
                                           r"\"evict\""):
        worker.call("cache_append", *args, "keep")
    with pytest.raises(RuntimeError, match=r"input 'length' holds -1 at batch 0"):
        worker.call("cache_append", *args[:3], torch.tensor([-1, 2]), *args[4:], "drop")


@pytest.mark.parametrize("order", ["library-then-python", "python-then-library"])
def test_both_registrations_in_one_process_fail_cleanly(worker, order):  # worker: the library is built
    """Never an abort: the library registers nothing after ham_export.ops; ham_export.ops refuses after the library."""
    load = f"torch.ops.load_library({str(LIBRARY)!r})"
    body = (f"{load}\ntry:\n    import ham_export.ops\nexcept Exception as exc:\n    print(type(exc).__name__, exc)"
            if order == "library-then-python" else
            f"import ham_export.ops\n{load}\nprint('ok', torch.ops.ham.cache_attention.default._schema.name)")
    run = subprocess.run([sys.executable, "-c", "import torch\n" + body], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    if order == "library-then-python":
        assert run.stdout.startswith("HamError the ham ops are already registered"), run.stdout
    else:
        assert run.stdout.strip() == "ok ham::cache_attention"
        assert "this library registers nothing" in run.stderr
