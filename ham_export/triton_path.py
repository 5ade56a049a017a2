"""The model's recurrence and cache side on the Triton kernels of ``kernels/``, caches and GDN state in place.

:class:`TritonKernels` plugs into :meth:`ham_export.model.HAMLM.run_with_state` (its ``kernels`` argument):

- prefill: ``kernels.gdn.gdn_chunked``; the router's score in PyTorch; ``kernels.prefill_attention`` over the
  cache as it stood plus the routed prompt tokens; ``kernels.cache_append.cache_append_`` in place;
- decode: ``kernels.gdn.gdn_step`` writing the GDN state in place, then ``kernels.decode_step.decode_step_``
  (score, route, flash-decoding attention and the append in place, four launches, no host synchronisation); a
  learned router's score is computed in PyTorch and handed to it.

The projections, norms, gates and MLP stay PyTorch ops. The state passed in is updated in place and returned. On
a CUDA GPU this is the fast eager decode; on the CPU the kernels run only under ``TRITON_INTERPRET=1`` (slowly:
the tests use it to check the whole model on the kernels against the reference).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from . import reference as ref
from .errors import InputError
from .model import HAMLayer, LayerState
from .ops import FORCE_REFERENCE, KernelUnavailableError, force_reference

KERNEL_MODULES = ("cache_append", "cache_attention", "decode_step", "gdn", "prefill_attention")


def check_device(device: torch.device) -> None:
    """Refuse a device the kernels cannot run on here, with the reason."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("the Triton path was asked for CUDA, but no CUDA GPU is visible to torch")
    elif device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise InputError("the Triton kernels need a CUDA GPU; on the CPU they run only under TRITON_INTERPRET=1 "
                             "(Triton's interpreter, slow)")
    else:
        raise InputError(f"the Triton path runs on cuda (or cpu under TRITON_INTERPRET=1), not {device}")


class TritonKernels:
    """The ``kernels`` argument of :meth:`HAMLM.run_with_state` that runs every HAM op on a Triton kernel."""

    def __init__(self) -> None:
        if force_reference():
            raise InputError(f"{FORCE_REFERENCE} is set: it asks for the reference, not the Triton path")
        try:
            self.k = {name: importlib.import_module(f"kernels.{name}") for name in KERNEL_MODULES}
        except ImportError as exc:
            raise KernelUnavailableError(f"the Triton kernels cannot be imported ({exc}); install triton (pip "
                                         f"install 'ham-export[triton]')") from None

    def gdn(self, decode: bool) -> Callable:
        return self._gdn_step if decode else self.k["gdn"].gdn_chunked

    def _gdn_step(self, q, k, v, g, beta, state):
        """``reference.gdn_recurrent`` for T = 1 ([B, 1, H, *]), with the state updated in place."""
        o, vhat, state = self.k["gdn"].gdn_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0].exp(), beta[:, 0], state,
                                                out_state=state)
        return o[:, None], vhat[:, None], state

    def cache_side(self, layer: HAMLayer, decode: bool) -> Callable:
        def run(x, q, k, v, vhat, state: LayerState, tau, policy: str):
            qh, kh, vh, vhath = (z.transpose(1, 2) for z in (q, k, v, vhat))
            caches = (state.k_cache, state.v_cache, state.score_cache, state.length)
            if decode:
                score = None if layer.router is None else layer._score(x, vhat, v)
                o, score, routed, overflow = self.k["decode_step"].decode_step_(
                    qh, kh, vh, vhath, *caches, tau, layer.attn_scale, policy, score)
            else:
                score = layer._score(x, vhat, v)
                routed = ref.route(score, tau.to(score.dtype))
                o = self.k["prefill_attention"].prefill_attention(qh, state.k_cache, state.v_cache, state.length, kh,
                                                                  vh, routed, layer.attn_scale)
                overflow = self.k["cache_append"].cache_append_(*caches, kh, vh, score, routed, policy)
            return o.transpose(1, 2), score, routed, (*caches, overflow)
        return run
