"""The libtorch op library (``runtimes/libtorch``) beyond what every implementation shares (the op suites run it as
``libtorch`` and ``libtorch-in-place``, in a worker process): strided inputs, and a process that meets both
registrations of the ``ham`` namespace (this library and ``ham_export.ops.library``) never aborts.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ham_export.ops import reference as ref

from .implementations import LIBTORCH, ROOT, _libtorch_missing, libtorch_worker
from .inputs import attention

pytestmark = pytest.mark.skipif(_libtorch_missing() is not None, reason=str(_libtorch_missing()))


def test_non_contiguous_inputs():
    args = attention(2, 3, 4, 8, 8, 6, lengths=[3, 8], seed=3)
    args[0] = args[0].transpose(2, 3).contiguous().transpose(2, 3)  # q with other strides, same values
    assert not args[0].is_contiguous()
    got = libtorch_worker().call("cache_attention", *args)
    torch.testing.assert_close(got, ref.cache_attention(*args), atol=1e-5, rtol=1e-5)


def test_the_in_place_op_refuses_strided_caches():
    from .inputs import append

    args = append(2, 2, 1, 6, 4, 4, lengths=[1, 2])
    args[0] = args[0].transpose(2, 3).contiguous().transpose(2, 3)
    from .implementations import ImplError

    with pytest.raises(ImplError, match="the caches written in place must be contiguous"):
        libtorch_worker().call("cache_append_", *args, "drop")


@pytest.mark.parametrize("order", ["library-then-python", "python-then-library"])
def test_both_registrations_in_one_process_fail_cleanly(order):
    """Never an abort: the library registers nothing after ham_export.ops.library; ham_export.ops.library refuses
    after the library."""
    load = f"torch.ops.load_library({str(LIBTORCH)!r})"
    body = (f"{load}\ntry:\n    import ham_export.ops.library\nexcept Exception as exc:\n"
            f"    print(type(exc).__name__, exc)"
            if order == "library-then-python" else
            f"import ham_export.ops.library\n{load}\nprint('ok', torch.ops.ham.cache_attention.default._schema.name)")
    run = subprocess.run([sys.executable, "-c", "import torch\n" + body], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    if order == "library-then-python":
        assert run.stdout.startswith("HamError the ham ops are already registered"), run.stdout
    else:
        assert run.stdout.strip() == "ok ham::cache_attention"
        assert "this library registers nothing" in run.stderr
