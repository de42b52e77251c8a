"""Ahead-of-time compile jobs for the linear family's core kernels (attnc/runtime/linear_kernels.py).

Every variant a spec can select (causal or not, with or without a decay, norm none or sum, with or without an
initial state) is compiled with the runtime's default schedule for a real NVIDIA target, so CI catches what the
interpreter accepts but the GPU compiler rejects and checks registers and spills (no GPU needed).
"""

from __future__ import annotations

from dataclasses import dataclass

from attnc.runtime import linear_kernels as lk
from attnc.runtime.layout import _next_pow2
from attnc.runtime.linear import _lin_default_config, _LinConfig

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
) -> list[CompileJob]:
    """Compile jobs of every core kernel for each variant, with `cfg` (default: the runtime's schedule)."""
    D = E = head_dim
    cfg = cfg or _lin_default_config(D, E)
    dot = "ieee" if dtype == "fp32" else "tf32"
    x, f32, i32 = f"*{dtype}", "*fp32", "i32"
    bk, bv = min(cfg.block_k, _next_pow2(D)), min(cfg.block_v, _next_pow2(E))
    out: list[CompileJob] = []
    for var in variants:
        flags = {"HAS_DECAY": var.decay, "NORM_SUM": var.norm_sum}
        shape = {"D": D, "E": E, "CHUNK": cfg.chunk}

        def job(fn, sig: dict[str, str], constexprs: dict[str, object], stages: int = cfg.num_stages) -> None:
            out.append(CompileJob(fn, sig, constexprs, cc=cc, num_warps=cfg.num_warps, num_stages=stages))

        ints = {"N": i32, "NH": i32, "REP_K": i32, "REP_V": i32, "NC": i32}
        job(
            lk._lin_fwd_state_kernel,
            {"KT": x, "V": x, "GL": f32, "GS": f32, "S0": f32, "Z0": f32, "HS": f32, "ZS": f32, **ints},
            {**shape, **flags, "BLOCK_K": bk, "BLOCK_V": bv, "HAS_S0": True, "DOT_PRECISION": dot},
        )
        job(
            lk._lin_fwd_out_kernel,
            {"QT": x, "KT": x, "V": x, "GL": f32, "HS": f32, "ZS": f32, "OUT": f32, "DEN": f32, **ints},
            {
                **shape,
                **flags,
                "BLOCK_D": _next_pow2(D),
                "BLOCK_V": bv,
                "CAUSAL": var.causal,
                "DOT_PRECISION": dot,
            },
        )
        job(
            lk._lin_bwd_dstate_kernel,
            {
                "QT": x,
                "DO": f32,
                "DDEN": f32,
                "GL": f32,
                "GS": f32,
                "DSO": f32,
                "DZO": f32,
                "DHS": f32,
                "DZS": f32,
                "N": i32,
                "NH": i32,
                "NC": i32,
            },
            {**shape, **flags, "BLOCK_K": bk, "BLOCK_V": bv, "HAS_DSO": True, "DOT_PRECISION": dot},
        )
        common = {**shape, **flags, "BLOCK_D": _next_pow2(D), "BLOCK_V": bv, "CAUSAL": var.causal}
        job(
            lk._lin_bwd_dq_kernel,
            {
                "QT": x,
                "KT": x,
                "V": x,
                "DO": f32,
                "DDEN": f32,
                "GL": f32,
                "HS": f32,
                "ZS": f32,
                "DQ": f32,
                **ints,
            },
            {**common, "DOT_PRECISION": dot},
        )
        job(
            lk._lin_bwd_dkv_kernel,
            {
                "QT": x,
                "KT": x,
                "V": x,
                "DO": f32,
                "DDEN": f32,
                "GL": f32,
                "GS": f32,
                "DHS": f32,
                "DZS": f32,
                "DK": f32,
                "DV": f32,
                **ints,
            },
            {**common, "DOT_PRECISION": dot},
        )
        if var.causal:
            job(
                lk._lin_recurrent_kernel,
                {
                    "QT": x,
                    "KT": x,
                    "V": x,
                    "GSTEP": f32,
                    "S0": f32,
                    "Z0": f32,
                    "OUT": f32,
                    "DEN": f32,
                    "SO": f32,
                    "ZO": f32,
                    "N": i32,
                    "NH": i32,
                    "REP_K": i32,
                    "REP_V": i32,
                },
                {"D": D, "E": E, **flags, "BLOCK_D": _next_pow2(D), "BLOCK_V": bv, "HAS_S0": True},
                stages=1,
            )
    return out
