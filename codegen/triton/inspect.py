"""Ahead-of-time compile jobs for every kernel of a generated module (what `attnc inspect` and CI run).

Each kernel is compiled for a real NVIDIA target with the default schedule of the runtime, so CI catches what
the interpreter accepts but the GPU compiler rejects, and reports shared memory, registers, spills and wgmma.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from attnc.dsl.ir import Attention, DType, TensorType

from attnc.runtime.layout import _next_pow2
from attnc.runtime.triton import _default_config, _default_split_config, _KernelConfig

from .aot import CompileJob
from .expr import aux_name, scalar_name
from .kernels import _EXTENTS, _QKV_STRIDES, LAYOUT_INTS, LAYOUT_POINTERS, KernelWriter

_PTR = {
    TensorType.FLOAT: "*fp32",
    TensorType.FLOAT16: "*fp16",
    TensorType.BFLOAT16: "*bf16",
    TensorType.FLOAT32: "*fp32",
    TensorType.FLOAT64: "*fp64",
    TensorType.INT: "*i64",
    TensorType.INT64: "*i64",
    TensorType.INT32: "*i32",
    TensorType.BOOL: "*i1",
}
_LEADING = {
    "fwd": {"_Q": "q", "_K": "q", "_V": "q", "_O": "q", "_ORAW": "*fp32", "_STAT": "*fp32"},
    "bwd_dkdv": {
        "_Q": "q",
        "_K": "q",
        "_V": "q",
        "_DO": "*fp32",
        "_STAT": "*fp32",
        "_DELTA": "*fp32",
        "_DK": "*fp32",
        "_DV": "*fp32",
    },
    "bwd_dq": {
        "_Q": "q",
        "_K": "q",
        "_V": "q",
        "_DO": "*fp32",
        "_STAT": "*fp32",
        "_DELTA": "*fp32",
        "_DQ": "*fp32",
    },
    # Split-KV decoding: partials in float32, then the combine writes o and the row statistic.
    "fwd_split": {"_Q": "q", "_K": "q", "_V": "q", "_OPART": "*fp32", "_LPART": "*fp32", "_SPLIT_N": "i32"},
    "fwd_combine": {
        "_OPART": "*fp32",
        "_LPART": "*fp32",
        "_NSPLIT": "i32",
        "_O": "q",
        "_ORAW": "*fp32",
        "_STAT": "*fp32",
    },
}


@dataclass(frozen=True)
class Target:
    cc: int
    dtype: str  # "fp16" | "bf16" | "fp32"
    head_dim: int
    kernels: tuple[str, ...] = ("fwd", "bwd_dkdv", "bwd_dq", "fwd_split", "fwd_combine")
    layout: bool = False  # compile the explicit-block-layout form (`_LAYOUT`) instead of the plain one


# What the issue asks CI to compile: forward and backward for sm_90 at D = 64 in fp16 and D = 128 in bf16,
# and the forward for sm_80.
CI_TARGETS = (Target(90, "fp16", 64), Target(90, "bf16", 128), Target(80, "fp16", 64, ("fwd",)))


def jobs(att: Attention, kernels_module: object, target: Target) -> list[CompileJob]:
    writer = KernelWriter(att)
    writer.kernels()  # fixes the hoisted uniforms, hence the signature tail
    tail: dict[str, str] = {}
    for p in att.aux_tensors:
        tail[aux_name(p.name)] = _PTR[p.type]
        for k in range(len(p.shape)):
            tail[f"_s_{p.name}_{k}"] = "i32"
        for k in range(len(p.shape)):
            tail[f"_n_{p.name}_{k}"] = "i32"
    for sc in att.scalars:
        tail[scalar_name(sc.name)] = "i32" if sc.dtype is DType.INT else "fp32"
    for sym in writer.size_symbols():
        tail[sym] = "i32"
    for node, var in writer.em._uniform_names.items():
        tail[var] = "i32" if node.dtype is DType.INT else "fp32"
    for name in _QKV_STRIDES:
        tail[name] = "i32"
    for name in _EXTENTS:
        tail[name] = "i32"
    for name in writer.summary_params():
        tail[name] = "*i64"
    for name in LAYOUT_POINTERS:
        tail[name] = "*i32"
    for name in LAYOUT_INTS:
        tail[name] = "i32"
    tail["_VISITS"] = "*i32"
    D = E = target.head_dim
    out = []
    for kind in target.kernels:
        cfg = _schedule(kind, D, E, writer.heavy)
        constexprs = {
            "_COUNT_VISITS": False,
            "_LAYOUT": target.layout and kind != "fwd_combine",
            "_BLOCK_M": cfg.block_m,
            "_BLOCK_N": cfg.block_n,
            "_BLOCK_D": _next_pow2(D),
            "_BLOCK_E": _next_pow2(E),
            "_DOT_PRECISION": "ieee" if target.dtype == "fp32" else "tf32",
        }
        fn = getattr(kernels_module, f"_{att.name}_{kind}_kernel")
        lead = {n: (f"*{target.dtype}" if t == "q" else t) for n, t in _LEADING[kind].items()}
        out.append(
            CompileJob(
                fn,
                {**lead, **tail},
                constexprs,
                cc=target.cc,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
        )
    return out


def _schedule(kind: str, D: int, E: int, heavy: bool) -> _KernelConfig:
    """The runtime's default schedule of each kernel (the combine: the split's rows, four warps)."""
    if kind in ("fwd_split", "fwd_combine"):
        cfg = _default_split_config(D, E, heavy)
        return cfg if kind == "fwd_split" else _KernelConfig(cfg.block_m, cfg.block_n, 4, 1)
    return _default_config(D, E, {"fwd": "fwd", "bwd_dkdv": "dkdv", "bwd_dq": "dq"}[kind], heavy)


def all_jobs(
    atts: Sequence[Attention], kernels_module: object, targets: Sequence[Target] = CI_TARGETS
) -> list[CompileJob]:
    return [j for att in atts for t in targets for j in jobs(att, kernels_module, t)]
