"""Ahead-of-time compile jobs for the linear family's core kernels (attnc/runtime/linear_kernels.py).

Every variant a spec can select (causal or not, with or without a decay, norm none or sum, with or without an
initial state) is compiled with the runtime's default schedule for a real NVIDIA target, so CI catches what the
interpreter accepts but the GPU compiler rejects and checks registers and spills (no GPU needed). `varlen=True`
gives the same jobs for the packed variable-length kernels (`*_varlen_kernel`, core_abi.LINEAR_VARLEN): the same
constexprs and launch options, their own signatures (cu_seqlens offsets, no GS).
"""

from __future__ import annotations

from dataclasses import dataclass

from attnc.runtime import core_abi as abi
from attnc.runtime import linear_kernels as lk
from attnc.runtime.layout import _next_pow2
from attnc.runtime.linear import _lin_default_config, _LinConfig
from attnc.runtime.signature import KernelSignature

from .aot import CompileJob


@dataclass(frozen=True)
class Variant:
    causal: bool
    decay: bool
    norm_sum: bool

    @property
    def label(self) -> str:
        return f"{'causal' if self.causal else 'bidir'}-{'decay' if self.decay else 'nodecay'}-{'sum' if self.norm_sum else 'none'}"


# What the example specs select: lightning/retention/gated (causal, decay, none), linear_elu (causal, sum),
# linear_bidir (bidirectional, sum), plus the remaining causal combinations.
VARIANTS = (
    Variant(True, True, False),
    Variant(True, False, True),
    Variant(False, False, True),
    Variant(True, True, True),
)


# Each batched core kernel's packed variable-length twin (the same constexprs), by kernel name.
_VARLEN: dict[str, KernelSignature] = {
    abi.LIN_FWD_STATE.name: abi.LIN_FWD_STATE_VARLEN,
    abi.LIN_FWD_OUT.name: abi.LIN_FWD_OUT_VARLEN,
    abi.LIN_BWD_DSTATE.name: abi.LIN_BWD_DSTATE_VARLEN,
    abi.LIN_BWD_DQ.name: abi.LIN_BWD_DQ_VARLEN,
    abi.LIN_BWD_DKV.name: abi.LIN_BWD_DKV_VARLEN,
    abi.LIN_RECURRENT.name: abi.LIN_RECURRENT_VARLEN,
}


def variant_of(att: object) -> Variant:
    """The core variant a linear-form attention selects (causal, decay, norm)."""
    from attnc.dsl.analysis.linear import linear_form
    from attnc.dsl.ir import NormKind

    decision = linear_form(att)  # type: ignore[arg-type]
    if decision is None or decision.form is None:
        raise ValueError("not a linear-form attention")
    f = decision.form
    return Variant(f.causal, f.log_decay is not None, att.norm.kind is NormKind.SUM)  # type: ignore[attr-defined]


def jobs(
    cc: int,
    dtype: str,
    head_dim: int,
    variants: tuple[Variant, ...] = VARIANTS,
    cfg: _LinConfig | None = None,
    *,
    varlen: bool = False,
) -> list[CompileJob]:
    """Compile jobs of every core kernel for each variant, with `cfg` (default: the runtime's schedule);
    `varlen`: of the packed variable-length kernels instead (the same constexprs and launch options)."""
    D = E = head_dim
    cfg = cfg or _lin_default_config(D, E)
    dot = "ieee" if dtype == "fp32" else "tf32"
    bk, bv = min(cfg.block_k, _next_pow2(D)), min(cfg.block_v, _next_pow2(E))
    out: list[CompileJob] = []

    def job(sig: KernelSignature, constexprs: dict[str, object], stages: int = cfg.num_stages) -> None:
        sig = _VARLEN[sig.name] if varlen else sig
        types, values = sig.compile_args(dtype, constexprs)  # typed from the launcher's own signature
        fn = getattr(lk, sig.name)
        out.append(CompileJob(fn, types, values, cc=cc, num_warps=cfg.num_warps, num_stages=stages))

    for var in variants:
        flags = {"HAS_DECAY": var.decay, "NORM_SUM": var.norm_sum}
        state = {
            "D": D,
            "E": E,
            "CHUNK": cfg.chunk,
            **flags,
            "BLOCK_K": bk,
            "BLOCK_V": bv,
            "DOT_PRECISION": dot,
        }
        job(abi.LIN_FWD_STATE, {**state, "HAS_S0": True})
        # The per-chunk kernels share their constexprs (`_LIN_CHUNK`), as the launcher's do.
        chunk = {**state, "BLOCK_D": _next_pow2(D), "CAUSAL": var.causal}
        del chunk["BLOCK_K"]
        job(abi.LIN_FWD_OUT, chunk)
        job(abi.LIN_BWD_DSTATE, {**state, "HAS_DSO": True})
        job(abi.LIN_BWD_DQ, chunk)
        job(abi.LIN_BWD_DKV, chunk)
        if var.causal:
            recurrent = {"D": D, "E": E, **flags, "BLOCK_D": _next_pow2(D), "BLOCK_V": bv, "HAS_S0": True}
            job(abi.LIN_RECURRENT, recurrent, stages=1)
    return out
