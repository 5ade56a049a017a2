"""One spec per HAM custom op: the single source of its name, version, inputs, outputs and attributes.

The torch.library schema (``ham::name``), the ONNX ``OpSchema`` (domain ``ham.ai``), the ONNX Runtime custom-op
library (``runtimes/onnxruntime``) and the manifest all follow from these specs; ``tests/test_opspec.py`` checks
that they agree. Argument order is that of the reference function in :mod:`ham_export.reference`.

Dtype letters: ``T`` a float tensor (float32 or float16, one per node), ``int64``, ``bool``.
"""

from __future__ import annotations

from dataclasses import dataclass

TORCH_NAMESPACE = "ham"
ONNX_DOMAIN = "ham.ai"
ONNX_DOMAIN_VERSION = 1


@dataclass(frozen=True)
class Arg:
    name: str
    dtype: str  # "T", "int64" or "bool"
    shape: str  # letters as in ham_export.reference, comma separated
    doc: str = ""


@dataclass(frozen=True)
class Attr:
    name: str
    kind: str  # "string"
    choices: tuple[str, ...] = ()
    doc: str = ""


@dataclass(frozen=True)
class OpSpec:
    name: str  # ONNX op type
    torch_name: str  # ham::<torch_name>, and the reference function's name
    version: int
    inputs: tuple[Arg, ...]
    outputs: tuple[Arg, ...]
    attributes: tuple[Attr, ...] = ()
    doc: str = ""

    def torch_schema(self) -> str:
        """The torch.library schema, e.g. ``(Tensor q, ..., str policy) -> (Tensor, Tensor)``."""
        args = [f"Tensor {a.name}" for a in self.inputs] + [f"str {a.name}" for a in self.attributes]
        outs = ", ".join("Tensor" for _ in self.outputs)
        return f"({', '.join(args)}) -> ({outs})" if len(self.outputs) > 1 else f"({', '.join(args)}) -> Tensor"


CACHE_ATTENTION = OpSpec(
    name="CacheAttention",
    torch_name="cache_attention",
    version=1,
    inputs=(
        Arg("q", "T", "B,H,T,K", "queries of the new tokens"),
        Arg("k_cache", "T", "B,H,C,K", "cached keys; entries past length are never read"),
        Arg("v_cache", "T", "B,H,C,V", "cached values"),
        Arg("length", "int64", "B", "valid cache entries"),
        Arg("k", "T", "B,H,T,K", "keys of the new tokens"),
        Arg("v", "T", "B,H,T,V", "values of the new tokens"),
        Arg("routed", "bool", "B,T", "which new tokens are routed to the cache"),
        Arg("scale", "T", "H", "per-head logit scale"),
    ),
    outputs=(Arg("o", "T", "B,H,T,V", "attention output; 0 where a query sees no key"),),
    doc="Query t attends over cache entries [0, length) and the routed new tokens s <= t.",
)

CACHE_APPEND = OpSpec(
    name="CacheAppend",
    torch_name="cache_append",
    version=1,
    inputs=(
        Arg("k_cache", "T", "B,H,C,K"),
        Arg("v_cache", "T", "B,H,C,V"),
        Arg("score_cache", "T", "B,C", "router score of each cached entry (for evict)"),
        Arg("length", "int64", "B"),
        Arg("k", "T", "B,H,T,K"),
        Arg("v", "T", "B,H,T,V"),
        Arg("score", "T", "B,T", "router score of each new token"),
        Arg("routed", "bool", "B,T"),
    ),
    outputs=(
        Arg("k_cache_out", "T", "B,H,C,K"),
        Arg("v_cache_out", "T", "B,H,C,V"),
        Arg("score_cache_out", "T", "B,C"),
        Arg("length_out", "int64", "B"),
        Arg("overflow", "int64", "B", "routed tokens of this call that found the cache full"),
    ),
    attributes=(Attr("policy", "string", ("drop", "evict"),
                     "drop: a token that finds the cache full is not stored; evict: it replaces the "
                     "lowest-score entry if its score is higher"),),
    doc="Store the routed new tokens at [length, ...) in order; at capacity the policy applies.",
)

GDN_PREFILL = OpSpec(
    name="GdnPrefill",
    torch_name="gdn_prefill",
    version=1,
    inputs=(
        Arg("q", "T", "B,T,H,K", "unit queries"),
        Arg("k", "T", "B,T,H,K", "unit keys"),
        Arg("v", "T", "B,T,H,V"),
        Arg("g", "T", "B,T,H", "log decay, alpha = exp(g)"),
        Arg("beta", "T", "B,T,H", "write strength"),
        Arg("state", "T", "B,H,K,V", "GDN state before the first token"),
    ),
    outputs=(
        Arg("o", "T", "B,T,H,V", "read-out (q^T S_t) / sqrt(K)"),
        Arg("vhat", "T", "B,T,H,V", "prediction alpha_t (k_t^T S_{t-1}), for the router"),
        Arg("state_out", "T", "B,H,K,V"),
    ),
    doc="The gated delta rule over T tokens from a given state.",
)

OPS = (CACHE_ATTENTION, CACHE_APPEND, GDN_PREFILL)
