"""The delta-rule family of linear attentions: state recurrences whose transition depends on the token.

Per (batch, head) a state S of shape [E, D] maps a key-space vector to a value-space vector. Over tokens
t = 0..T-1, starting from S_{-1} = initial_state (zeros by default):

    S_t = S_{t-1} · T_t + v'_t k'_tᵀ,    T_t = Diag(w_t) + a_t b_tᵀ,    w_t = exp(g_t),    o_t = S_t q_t

The transition multiplies the state from the right (S·T: T acts on the key side), the orientation of
DeltaNet and Gated DeltaNet (state [d_v, d_k], o = S q). Papers that keep the state as [d_k, d_v]
(GLA, KDA) write S_t = T_tᵀ-style products on the left (S_t = (I − β k kᵀ) Diag(α) S_{t-1} + β k vᵀ,
o = Sᵀ q): transposing their state gives exactly this form. The variants:

    variant          w_t = exp(g_t)          a_t        b_t          v'_t    k'_t   source
    DeltaNet         1 (g absent)            k_t        −β_t k_t     β_t v_t  k_t    Yang et al. 2024, eq. (1)
    Gated DeltaNet   α_t (scalar per token)  α_t k_t    −β_t k_t     β_t v_t  k_t    Yang, Kautz, Hatamizadeh 2024
    KDA              α_t ∈ R^D (per channel) α_t ⊙ k_t  −β_t k_t     β_t v_t  k_t    Kimi Linear 2025, eq. (1)
    GLA              α_t ∈ R^D               (none)     (none)       v_t      k_t    Yang et al. 2023
    DPLR / RWKV-7    w_t ∈ R^D               a_t        b_t          v_t      k_t    RWKV-7 2025, eq. (16)

Gated DeltaNet: T_t = α_t (I − β_t k_t k_tᵀ) = α_t I − (α_t k_t)(β_t k_t)ᵀ. KDA follows the paper's order,
decay first and then the delta correction on the decayed state: in the paper's [d_k, d_v] orientation
S_t = (I − β_t k_t k_tᵀ) Diag(α_t) S_{t-1} + β_t k_t v_tᵀ, i.e. here T_t = Diag(α_t)(I − β_t k_t k_tᵀ)
= Diag(α_t) − (α_t ⊙ k_t)(β_t k_t)ᵀ. RWKV-7 passes its own a = −κ̂, b = κ̂ ⊙ a (in-context learning rate)
and w = exp(−exp(·)) as g = −exp(·).

Entry points (all take [B, H, T, D]-layout tensors; see docs/delta.md):
- `delta_rule(q, k, v, beta, g=None)`: DeltaNet (g None), Gated DeltaNet (g [B, H, T]), KDA (g [B, H, T, D]);
- `gla(q, k, v, g)`: per-channel (or scalar) decay, no rank-1 part;
- `dplr(q, k, v, a, b, g=None)`: the general diagonal-plus-rank-1 transition;
- `dplr_reference(...)`: the exact token-by-token PyTorch recurrence (float32, or float64 for float64 input).

Algorithms (`algorithm=`): "recurrent" (token by token, any variant; Triton forward and backward),
"chunk" (the delta rule in every gate form — DeltaNet, Gated DeltaNet, KDA — and GLA: the chunk-parallel
kernels of delta_chunk.py / delta_chunk_bwd.py, WY / UT transform per chunk, forward and backward, batched
and packed), "reference" (PyTorch), "auto" (chunk when T ≥ 64 where the
variant has a chunked form, else recurrent). CPU tensors run the Triton kernels
under the Triton interpreter.

Heads: every tensor's head count must divide the largest one, H; the state has H heads and an input with
H/r heads is shared by r consecutive state heads (GQA-style shared q/k, or shared k/v). Each state head
computes its own state (the kernels do not deduplicate shared work).
"""

from __future__ import annotations

import enum
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from .core_abi import (
    DELTA_RECURRENT_BWD,
    DELTA_RECURRENT_BWD_VARLEN,
    DELTA_RECURRENT_FWD,
    DELTA_RECURRENT_FWD_VARLEN,
    launch_core,
)
from .delta_chunk import _cdiv, _fold_heads, _g_mode, _next_pow2, chunk_forward, chunk_table
from .delta_chunk_bwd import chunk_backward
from .varlen import check_offsets, longest_sequence, read_offsets, sync_allowed

__all__ = [
    "Algorithm",
    "DeltaConfig",
    "default_config",
    "delta_rule",
    "delta_rule_varlen",
    "dplr",
    "dplr_reference",
    "dplr_varlen",
    "gla",
    "gla_varlen",
    "packed_load",
    "spec_grid",
    "spec_grid_varlen",
    "spec_input",
    "spec_rows",
    "varlen_cu",
]


class Algorithm(str, enum.Enum):
    AUTO = "auto"
    CHUNK = "chunk"
    RECURRENT = "recurrent"
    REFERENCE = "reference"


@dataclass(frozen=True)
class DeltaConfig:
    """The schedule of the kernels (never part of the math).

    chunk: tokens per chunk of the chunked algorithm, a power of two ≥ 16 (tl.dot needs K ≥ 16): the
        chunk-parallel kernels' C (64 by default: wgmma-sized products at D = 128), in batches and in packed
        (varlen) batches alike;
    ckpt: checkpoint interval of the recurrent backward (the state entering every ckpt-th token is stored);
    block_e: rows of the state (value channels) per program of the recurrent kernels; E is split over programs;
    num_warps: warps per program of the recurrent kernels (the chunk-parallel kernels take theirs from
        `delta_chunk.default_chunk_config` and `delta_chunk_bwd.default_schedule`)."""

    chunk: int = 64
    ckpt: int = 32
    block_e: int = 32
    num_warps: int = 4
    num_stages: int = 1  # the recurrent kernels are sequential over tokens: nothing to pipeline across loads

    def __post_init__(self) -> None:
        for name in ("chunk", "ckpt", "block_e"):
            n = getattr(self, name)
            if n < 1 or n & (n - 1):
                raise ValueError(f"DeltaConfig.{name} must be a power of two, got {n}")
        if self.chunk < 16:
            raise ValueError(f"DeltaConfig.chunk must be at least 16 (tl.dot), got {self.chunk}")


def default_config(D: int, E: int) -> DeltaConfig:
    """Schedules that compile for sm_90 without spills (tests/test_delta_rule.py compiles every kernel ahead
    of time and checks): chunks of 64 for the chunk-parallel kernels (batched and packed); the recurrent
    kernels hold 32 state rows per program, on 4 warps up to D = 64 and 8 for wider heads."""
    width = _next_pow2(max(D, 16))
    block_e = max(16, min(_next_pow2(E), 32))
    return DeltaConfig(chunk=64, ckpt=32, block_e=block_e, num_warps=4 if width <= 64 else 8)


# ---------------------------------------------------------------------------------------------- kernels

_KERNELS: dict[bool, ModuleType] = {}


def _kernels(interpret: bool) -> ModuleType:
    """delta_kernels.py, loaded once per mode: `interpret` runs the kernels under the Triton interpreter (CPU
    tensors), which Triton decides when kernels are defined — as codegen/reference_runtime's `_triton_kernels`
    does for generated kernel files."""
    if interpret not in _KERNELS:
        path = Path(__file__).with_name("delta_kernels.py")
        if interpret:
            # Read by Triton when kernels are defined and when its helpers import; switching back within a
            # process is not supported, so CPU tensors leave the process in interpreter mode.
            os.environ["TRITON_INTERPRET"] = "1"
        spec = importlib.util.spec_from_file_location(f"_attnc_delta_kernels_{int(interpret)}", path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _KERNELS[interpret] = mod
    return _KERNELS[interpret]


# ---------------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class _Shape:
    B: int
    H: int  # state heads: the largest head count of the inputs
    T: int
    D: int
    E: int


@dataclass(frozen=True)
class _Seqs:
    """A packed batch's sequences, as the varlen kernels read them (device tensors: no host synchronisation).
    The kernels see the batch as B = 1, T = total; their programs are (E-block, sequence·H + head)."""

    cu: torch.Tensor  # int32 [nseq + 1]: each sequence's first row, then total
    nseq: int
    total: int

    def slots(self, interval: int) -> tuple[torch.Tensor, int]:
        """Stored states one per `interval` tokens of each sequence (the recurrent kernels' checkpoints): the
        first slot of each sequence (int32 [nseq], computed on the device) and the slots per head, an upper
        bound known from the shapes: Σ_s ceil(n_s / C) ≤ total // C + nseq."""
        n = ((self.cu[1:] - self.cu[:-1]).long() + interval - 1) // interval
        co = (torch.cumsum(n, 0) - n).to(torch.int32)
        return co, self.total // interval + self.nseq


def _state_stack(seqs, interval, shape, sigs, store, q):  # type: ignore[no-untyped-def]
    """A forward's stored states, one per `interval` tokens (the recurrent checkpoints): (slots per
    head, the varlen kernels' offset arguments, the signature, the float32 stack or a dummy when not
    stored). A batch stacks [B, H, slots, E, D]; a packed batch [H, slots, E, D] with each sequence's first
    slot on the device (`_Seqs.slots`)."""
    B, H, T, E, D = shape
    if seqs is None:
        n, co, sig, hs_shape = _cdiv(T, interval), {}, sigs[0], (B, H, _cdiv(T, interval), E, D)
    else:
        co_t, n = seqs.slots(interval)
        co, sig, hs_shape = {"CU": seqs.cu, "CO": co_t}, sigs[1], (H, n, E, D)
    hs = torch.empty(hs_shape, device=q.device, dtype=torch.float32) if store else _dummy(q)
    return n, co, sig, hs


def _fail(fn: str, msg: str) -> ValueError:
    return ValueError(f"{fn}: {msg}")


def _check(
    fn: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    beta: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> _Shape:
    """Shapes, dtypes and devices of a call, with errors that name the parameter and the expected shape."""
    named = {"q": q, "k": k, "v": v, "beta": beta, "g": g, "a": a, "b": b, "initial_state": initial_state}
    for name, x in named.items():
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise _fail(fn, f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise _fail(fn, f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.device != q.device:
            raise _fail(fn, f"{name} is on {x.device} but q is on {q.device}")
    if q.dim() != 4:
        raise _fail(fn, f"q must have shape [B, H, T, D], got {tuple(q.shape)}")
    B, _, T, D = q.shape
    if T < 1:
        raise _fail(
            fn, f"q must hold at least one token (shape [B, H, T, D] with T ≥ 1), got {tuple(q.shape)}"
        )
    if D < 1 or D > 256:
        raise _fail(fn, f"the key head dim D must be in 1..256, got q of shape {tuple(q.shape)}")

    def expect(name: str, x: torch.Tensor, dims: str, want: tuple[int | None, ...]) -> None:
        got = tuple(x.shape)
        ok = len(got) == len(want) and all(w is None or w == s for w, s in zip(want, got, strict=False))
        if not ok:
            shown = ", ".join("*" if w is None else str(w) for w in want)
            raise _fail(fn, f"{name} must have shape {dims} = [{shown}], got {got}")

    expect("k", k, "[B, Hk, T, D]", (B, None, T, D))
    if v.dim() != 4:
        raise _fail(fn, f"v must have shape [B, Hv, T, E] = [{B}, *, {T}, *], got {tuple(v.shape)}")
    expect("v", v, "[B, Hv, T, E]", (B, None, T, None))
    E = v.shape[3]
    if E < 1 or E > 256:
        raise _fail(fn, f"the value head dim E must be in 1..256, got v of shape {tuple(v.shape)}")
    if beta is not None:
        expect("beta", beta, "[B, Hb, T]", (B, None, T))
    if g is not None:
        if g.dim() == 3:
            expect("g", g, "[B, Hg, T] (scalar gate) or [B, Hg, T, D] (per channel)", (B, None, T))
        else:
            expect("g", g, "[B, Hg, T] (scalar gate) or [B, Hg, T, D] (per channel)", (B, None, T, D))
    if (a is None) != (b is None):
        raise _fail(
            fn, "a and b come together (the rank-1 part a bᵀ of the transition): pass both or neither"
        )
    if a is not None and b is not None:
        expect("a", a, "[B, Ha, T, D]", (B, None, T, D))
        expect("b", b, "[B, Hb, T, D]", (B, None, T, D))
    heads = {n: x.shape[1] for n, x in named.items() if x is not None and n != "initial_state"}
    H = max(heads.values())
    for name, h in heads.items():
        if h < 1 or H % h:
            raise _fail(
                fn,
                f"{name} has {h} heads, which does not divide the largest head count {H} "
                f"(heads: {', '.join(f'{n}={c}' for n, c in heads.items())}); shared heads need H % heads == 0",
            )
    if initial_state is not None:
        expect("initial_state", initial_state, "[B, H, E, D]", (B, H, E, D))
    return _Shape(B, H, T, D, E)


def _expand_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """[B, h, ...] → [B, H, ...]: state head i reads input head i // (H / h)."""
    rep = H // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def _algorithm(algorithm: Algorithm | str, fn: str) -> Algorithm:
    try:
        return Algorithm(algorithm)
    except ValueError:
        choices = ", ".join(repr(a.value) for a in Algorithm)
        raise _fail(fn, f"algorithm must be one of {choices}, got {algorithm!r}") from None


# ---------------------------------------------------------------------------------------------- reference


def dplr_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence token by token in PyTorch (float64 when any input is float64, else float32); autograd
    gives every gradient. Returns o [B, H, T, E] in q's dtype and the final state [B, H, E, D]."""
    shape = _check("dplr_reference", q, k, v, g=g, a=a, b=b, initial_state=initial_state)
    B, H, T, D, E = shape.B, shape.H, shape.T, shape.D, shape.E
    inputs = [x for x in (q, k, v, g, a, b, initial_state) if x is not None]
    ct = torch.float64 if any(x.dtype == torch.float64 for x in inputs) else torch.float32
    qe, ke, ve = (_expand_heads(x, H).to(ct) for x in (q, k, v))
    S = (
        initial_state.to(ct)
        if initial_state is not None
        else torch.zeros(B, H, E, D, dtype=ct, device=q.device)
    )
    ge = None if g is None else _expand_heads(g, H).to(ct)
    ae = None if a is None else _expand_heads(a, H).to(ct)
    be = None if b is None else _expand_heads(b, H).to(ct)
    outs = []
    for t in range(T):
        nxt = S
        if ge is not None:
            w = ge[:, :, t].exp()
            nxt = nxt * (w[..., None, None] if ge.dim() == 3 else w[:, :, None, :])
        if ae is not None and be is not None:
            u = torch.einsum("bhed,bhd->bhe", S, ae[:, :, t])
            nxt = nxt + u[..., None] * be[:, :, t, None, :]
        S = nxt + ve[:, :, t, :, None] * ke[:, :, t, None, :]
        outs.append(torch.einsum("bhed,bhd->bhe", S, qe[:, :, t]))
    return torch.stack(outs, dim=2).to(q.dtype), S


# ---------------------------------------------------------------------------------------------- recurrent


def _dummy(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(1, dtype=torch.float32)


def _rep(shape: _Shape, x: torch.Tensor | None) -> int:
    return 1 if x is None else shape.H // x.shape[1]


def _reps(shape: _Shape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, int]:
    """The state heads per head of q, k and v (every delta kernel's REP_Q, REP_K, REP_V)."""
    return {"REP_Q": _rep(shape, q), "REP_K": _rep(shape, k), "REP_V": _rep(shape, v)}


def _recurrent_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    s0: torch.Tensor | None,
    shape: _Shape,
    cfg: DeltaConfig,
    store_ckpt: bool,
    seqs: _Seqs | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """o [B, H, T, E] fp32, the final state [B, H, E, D] fp32 and the checkpoints [B, H, NCK, E, D]. A packed
    batch (`seqs`; B = 1, T = total): final states [nseq, H, E, D], checkpoints [H, slots, E, D]."""
    B, H, T, D, E = shape.B, shape.H, shape.T, shape.D, shape.E
    kern = _kernels(interpret=q.device.type != "cuda")
    dev = q.device
    o = torch.empty(B, H, T, E, device=dev, dtype=torch.float32)
    nst = B if seqs is None else seqs.nseq  # states: one per batch row, or per sequence
    sn = torch.empty(nst, H, E, D, device=dev, dtype=torch.float32)
    d = _dummy(q)
    nck, co, sig, hs = _state_stack(
        seqs, cfg.ckpt, (B, H, T, E, D), (DELTA_RECURRENT_FWD, DELTA_RECURRENT_FWD_VARLEN), store_ckpt, q
    )
    be = min(cfg.block_e, _next_pow2(E))
    launch_core(
        kern, sig, (_cdiv(E, be), nst * H),
        dict(Q=q, K=k, V=v, G=d if g is None else g, RA=d if a is None else a, RB=d if b is None else b,
             S0=d if s0 is None else s0, OUT=o, SN=sn, HS=hs, **co),
        dict(T=T, H=H, **_reps(shape, q, k, v), REP_G=_rep(shape, g), REP_R=_rep(shape, a), NCK=nck),
        dict(D=D, E=E, BLOCK_D=_next_pow2(D), BLOCK_E=be, G_MODE=_g_mode(g), HAS_RANK1=a is not None,
             HAS_S0=s0 is not None, STORE_CKPT=store_ckpt, CKPT=cfg.ckpt),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return o, sn, hs


def _recurrent_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    hs: torch.Tensor,
    do: torch.Tensor,
    dsn: torch.Tensor | None,
    shape: _Shape,
    cfg: DeltaConfig,
    seqs: _Seqs | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of (q, k, v, g, a, b, initial_state), each shaped like its input (fp32). A packed batch
    (`seqs`): hs [H, slots, E, D] stored every `ckpt` tokens of each sequence, dsn and ds0 [nseq, H, E, D]."""
    ckpt = cfg.ckpt
    B, H, T, D, E = shape.B, shape.H, shape.T, shape.D, shape.E
    kern = _kernels(interpret=q.device.type != "cuda")
    dev, f32 = q.device, torch.float32
    be = min(cfg.block_e, _next_pow2(E))
    ne, bd = _cdiv(E, be), _next_pow2(D)
    if seqs is None:
        nst, nck, co, sig = B, hs.shape[2], {}, DELTA_RECURRENT_BWD
    else:
        co_t, nck = seqs.slots(ckpt)
        nst, co, sig = seqs.nseq, {"CU": seqs.cu, "CO": co_t}, DELTA_RECURRENT_BWD_VARLEN
    dq = torch.empty(ne, B, H, T, D, device=dev, dtype=f32)
    dk = torch.empty_like(dq)
    dv = torch.empty(B, H, T, E, device=dev, dtype=f32)
    gm = _g_mode(g)
    dg = torch.empty(ne, B, H, T, *((D,) if gm == 2 else ()), device=dev, dtype=f32) if gm else _dummy(q)
    da = torch.empty_like(dq) if a is not None else _dummy(q)
    db = torch.empty_like(dq) if a is not None else _dummy(q)
    ds0 = torch.empty(nst, H, E, D, device=dev, dtype=f32)
    scr = torch.empty(ne * nst * H, ckpt, be, bd, device=dev, dtype=f32)
    d = _dummy(q)
    launch_core(
        kern, sig, (ne, nst * H),
        dict(Q=q, K=k, V=v, G=d if g is None else g, RA=d if a is None else a, RB=d if b is None else b,
             HS=hs, DO=do.contiguous(), DSN=d if dsn is None else dsn.contiguous(), SCR=scr, DQ=dq, DK=dk,
             DV=dv, DG=dg, DA=da, DB=db, DS0=ds0, **co),
        dict(T=T, H=H, NBH=nst * H, **_reps(shape, q, k, v), REP_G=_rep(shape, g), REP_R=_rep(shape, a),
             NCK=nck),
        dict(D=D, E=E, BLOCK_D=bd, BLOCK_E=be, G_MODE=gm, HAS_RANK1=a is not None, HAS_DSN=dsn is not None,
             CKPT=ckpt),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    grads: list[torch.Tensor | None] = [
        _fold_heads(dq.sum(0), q.shape[1]),
        _fold_heads(dk.sum(0), k.shape[1]),
        _fold_heads(dv, v.shape[1]),
        None if g is None else _fold_heads(dg.sum(0), g.shape[1]),
        None if a is None else _fold_heads(da.sum(0), a.shape[1]),
        None if b is None else _fold_heads(db.sum(0), b.shape[1]),
        ds0,
    ]
    return tuple(grads)


class _RecurrentFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, a, b, s0, shape, cfg, seqs):  # type: ignore[override]
        store = any(ctx.needs_input_grad[:7])
        o, sn, hs = _recurrent_fwd(q, k, v, g, a, b, s0, shape, cfg, store, seqs)
        ctx.save_for_backward(q, k, v, g, a, b, hs)
        ctx.meta = (shape, cfg, s0 is not None, seqs)
        ctx.set_materialize_grads(False)
        return o, sn

    @staticmethod
    def backward(ctx, do, dsn):  # type: ignore[override]
        q, k, v, g, a, b, hs = ctx.saved_tensors
        shape, cfg, has_s0, seqs = ctx.meta
        if do is None:
            do = torch.zeros(shape.B, shape.H, shape.T, shape.E, device=q.device, dtype=torch.float32)
        grads = _recurrent_bwd(q, k, v, g, a, b, hs, do, dsn, shape, cfg, seqs)
        inputs = (q, k, v, g, a, b)
        out = [None if gr is None else gr.to(x.dtype) for gr, x in zip(grads[:6], inputs, strict=True)]
        return (*out, grads[6] if has_s0 else None, None, None, None)


def _prep(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.contiguous()


# ---------------------------------------------------------------------------------------------- chunked


def _delta_as_dplr(k, v, beta, g, H):
    """The delta rule's transition in DPLR form at H heads: a = α k, b = −β k, v' = β v (w = α)."""
    ke, ve, be = _expand_heads(k, H), _expand_heads(v, H), _expand_heads(beta, H)
    if g is None:
        a = ke
    else:
        ge = _expand_heads(g, H)
        alpha = ge.exp()[..., None] if ge.dim() == 3 else ge.exp()
        a = alpha * ke
    return ke, be[..., None] * ve, a, -be[..., None] * ke


class _ChunkFn(torch.autograd.Function):
    """The chunk-parallel algorithm on a batch, or on a packed batch (`table`, delta_chunk.ChunkTable: the same
    kernels over [1, heads, total, ...] rows, chunks starting at each sequence's first token):
    delta_chunk.chunk_forward, whose intermediates (the chunk-local cumulative gates, the WY factors, the
    pseudo-values and the chunk-entering states) the backward (delta_chunk_bwd.chunk_backward) reads instead
    of running the forward again."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, s0, shape, cfg, delta, table=None):  # type: ignore[override]
        store = any(ctx.needs_input_grad[:6])
        f = chunk_forward(q, k, v, beta, g, s0, delta=delta, chunk=cfg.chunk, store=store, table=table)
        if store:
            ctx.save_for_backward(q, k, v, beta, g, f.gc, f.ai, f.w, f.ut, f.hs, f.u)
        ctx.meta = (shape, cfg, s0 is not None, delta, table)
        ctx.set_materialize_grads(False)
        return f.o, f.sn

    @staticmethod
    def backward(ctx, do, dsn):  # type: ignore[override]
        q, k, v, beta, g, gc, ai, w, ut, hs, u = ctx.saved_tensors
        shape, cfg, has_s0, delta, table = ctx.meta
        if do is None:
            do = torch.zeros(shape.B, shape.H, shape.T, shape.E, device=q.device, dtype=torch.float32)
        dq, dk, dv, dbeta, dg, ds0 = chunk_backward(
            q, k, v, beta, g, do.contiguous(), None if dsn is None else dsn.contiguous(),
            gc=gc, ai=ai, w=w, ut=ut, hs=hs, u=u, delta=delta, chunk=cfg.chunk, table=table,
        )  # fmt: skip
        out = [
            None if gr is None or x is None else gr.to(x.dtype)
            for gr, x in zip((dq, dk, dv, dbeta, dg), (q, k, v, beta, g), strict=True)
        ]
        return (*out, ds0 if has_s0 else None, None, None, None, None)


# ---------------------------------------------------------------------------------------------- API


def _finish(o: torch.Tensor, sn: torch.Tensor, q: torch.Tensor, return_state: bool):
    o = o.to(q.dtype)
    return (o, sn) if return_state else o


def _state_in(initial_state: torch.Tensor | None) -> torch.Tensor | None:
    return None if initial_state is None else initial_state.float().contiguous()


def dplr(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    g: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
    algorithm: Algorithm | str = Algorithm.AUTO,
    config: DeltaConfig | None = None,
):
    """S_t = S_{t-1}(Diag(exp g_t) + a_t b_tᵀ) + v_t k_tᵀ, o_t = S_t q_t (RWKV-7 / DPLR; GLA without a, b).

    q [B, Hq, T, D], k [B, Hk, T, D], v [B, Hv, T, E], a, b [B, Ha, T, D] (both or neither),
    g [B, Hg, T] or [B, Hg, T, D] (log of w; absent: w = 1), initial_state [B, H, E, D].
    Returns o [B, H, T, E] (q's dtype), and the final state [B, H, E, D] (float32) with return_state=True.
    With a rank-1 part: the recurrent algorithm ("auto" and "recurrent") or the PyTorch reference. Without
    (GLA, or plain linear attention without g): also "chunk", which "auto" takes when T ≥ 64."""
    fn = "dplr"
    alg = _algorithm(algorithm, fn)
    shape = _check(fn, q, k, v, g=g, a=a, b=b, initial_state=initial_state)
    rank1 = a is not None or b is not None
    if alg is Algorithm.CHUNK and rank1:
        raise _fail(
            fn,
            "algorithm='chunk' covers the delta rule (delta_rule) and transitions without a rank-1 part (GLA); "
            "a general a bᵀ part runs with algorithm='recurrent'",
        )
    if alg is Algorithm.AUTO:
        alg = Algorithm.CHUNK if not rank1 and shape.T >= 64 else Algorithm.RECURRENT
    if alg is Algorithm.REFERENCE:
        o, sn = dplr_reference(q, k, v, g=g, a=a, b=b, initial_state=initial_state)
        return (o, sn) if return_state else o
    cfg = config or default_config(shape.D, shape.E)
    if alg is Algorithm.CHUNK:  # GLA: the chunk-parallel kernels without the delta correction
        o, sn = _ChunkFn.apply(
            q.contiguous(), k.contiguous(), v.contiguous(), None, _prep(g), _state_in(initial_state),
            shape, cfg, False,
        )  # fmt: skip
        return _finish(o, sn, q, return_state)
    o, sn = _RecurrentFn.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), _prep(g), _prep(a), _prep(b),
        _state_in(initial_state), shape, cfg, None,
    )  # fmt: skip
    return _finish(o, sn, q, return_state)


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
    algorithm: Algorithm | str = Algorithm.AUTO,
    config: DeltaConfig | None = None,
):
    """Gated linear attention: S_t = S_{t-1} Diag(exp g_t) + v_t k_tᵀ, o_t = S_t q_t, with a per-channel
    log-decay g [B, Hg, T, D] (or a scalar one, [B, Hg, T]). No exp(±cumsum) feature maps: every step
    multiplies by exp(g_t) ≤ 1 in float32, so nothing overflows at any T. Shapes as `dplr`."""
    if g is None:
        raise _fail("gla", "g (the log-decay, [B, Hg, T, D] or [B, Hg, T]) is required")
    return dplr(
        q,
        k,
        v,
        g=g,
        initial_state=initial_state,
        return_state=return_state,
        algorithm=algorithm,
        config=config,
    )


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
    algorithm: Algorithm | str = Algorithm.AUTO,
    config: DeltaConfig | None = None,
):
    """S_t = S_{t-1} Diag(α_t)(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t, α_t = exp(g_t).

    g absent: DeltaNet; g [B, Hg, T] (one log-gate per token): Gated DeltaNet; g [B, Hg, T, D]: KDA.
    q [B, Hq, T, D], k [B, Hk, T, D] (L2-normalise it for the models' behaviour; not required),
    v [B, Hv, T, E], beta [B, Hb, T], initial_state [B, H, E, D] (float32). Returns o [B, H, T, E] in q's
    dtype, and the final state [B, H, E, D] (float32) with return_state=True.
    algorithm: "chunk" (every gate form), "recurrent", "reference" or "auto" (chunk when T ≥ 64, else
    recurrent)."""
    fn = "delta_rule"
    alg = _algorithm(algorithm, fn)
    if beta is None:
        raise _fail(fn, "beta (the writing strength, [B, Hb, T]) is required")
    shape = _check(fn, q, k, v, beta=beta, g=g, initial_state=initial_state)
    if alg is Algorithm.AUTO:
        alg = Algorithm.CHUNK if shape.T >= 64 else Algorithm.RECURRENT
    H = shape.H
    if alg is not Algorithm.CHUNK:
        kp, vp, a, b = _delta_as_dplr(k, v, beta, g, H)
        return dplr(
            q, kp, vp, a, b, g=None if g is None else _expand_heads(g, H), initial_state=initial_state,
            return_state=return_state, algorithm=alg, config=config,
        )  # fmt: skip
    cfg = config or default_config(shape.D, shape.E)
    o, sn = _ChunkFn.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(), _prep(g), _state_in(initial_state),
        shape, cfg, True,
    )  # fmt: skip
    return _finish(o, sn, q, return_state)


# ---------------------------------------------------------------------------------------------- packed batches
# Variable-length sequences packed one after another (FlashAttention's varlen convention): per-token tensors
# [total, heads, ...] (the batched [B, heads, T, ...] without B, sequence axis first), cu_seqlens int32
# [nseq + 1] (0, ..., total), states [nseq, H, E, D]. The kernels see the batch as B = 1, T = total: one
# program per (E-block, sequence, head) walks only its sequence (`_Seqs`); nothing crosses a boundary.


def _varlen_cu(fn: str, cu_seqlens: object, device: torch.device) -> int:
    """cu_seqlens' type, dtype, rank and device (`varlen.check_offsets`, no host read); returns nseq."""
    try:
        return check_offsets("cu_seqlens", cu_seqlens, device).numel() - 1
    except ValueError as err:
        raise _fail(fn, str(err)) from None


def _varlen_offsets(fn: str, cu_seqlens: torch.Tensor, total: int) -> list[int]:
    """cu_seqlens' values, checked (`varlen.read_offsets`: a host synchronisation for CUDA tensors)."""
    try:
        return read_offsets("cu_seqlens", cu_seqlens, total)
    except ValueError as err:
        raise _fail(fn, str(err)) from None


def _varlen_max(fn: str, cu_seqlens: torch.Tensor, total: int, max_seqlen: object) -> int:
    """The longest sequence (`varlen.longest_sequence`): max_seqlen as given (no synchronisation for CUDA
    tensors), else read from cu_seqlens (one synchronisation); CPU offsets are always checked."""
    check = sync_allowed(cu_seqlens, max_seqlen is None)
    try:
        if max_seqlen is None and not check:
            raise ValueError(
                "max_seqlen: required under torch.compile (a traced graph cannot read the offsets)"
            )
        return longest_sequence("cu_seqlens", cu_seqlens, total, max_seqlen, check)
    except ValueError as err:
        raise _fail(fn, str(err)) from None


def _unpack(x: torch.Tensor | None) -> torch.Tensor | None:
    """[total, heads, ...] → the kernels' [1, heads, total, ...] (a view)."""
    return None if x is None else x.movedim(0, 1)[None]


@dataclass(frozen=True)
class _Packed:
    """A checked packed call on the kernels' views ([1, heads, total, ...])."""

    fn: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    aux: dict[str, torch.Tensor | None]
    s0: torch.Tensor | None  # [nseq, H, E, D]
    seqs: _Seqs
    longest: int
    shape: _Shape | None  # None for an empty batch (total = 0)
    heads: int


def _varlen_setup(fn, q, k, v, cu_seqlens, max_seqlen, initial_state, **aux) -> _Packed:
    """Shapes, dtypes, devices and offsets of a packed call (errors name the parameter and its shape)."""
    named = {"q": q, "k": k, "v": v, **aux}
    for name, x in [*named.items(), ("initial_state", initial_state)]:
        if x is not None and not isinstance(x, torch.Tensor):
            raise _fail(fn, f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if q.dim() != 3:
        raise _fail(fn, f"q must have shape [total, H, D] (the packed sequences), got {tuple(q.shape)}")
    total, D = q.shape[0], q.shape[2]
    want = {"k": "[total, Hk, D]", "v": "[total, Hv, E]", "a": "[total, Ha, D]", "b": "[total, Hb, D]"}
    want |= {"beta": "[total, Hb]", "g": "[total, Hg] (scalar gate) or [total, Hg, D] (per channel)"}
    for name, x in named.items():
        if x is None or name == "q":
            continue
        ranks = (2, 3) if name == "g" else (2,) if name == "beta" else (3,)
        keyed = name in ("k", "a", "b") or (name == "g" and x.dim() == 3)
        if x.dim() not in ranks or x.shape[0] != total or (keyed and x.shape[2] != D):
            raise _fail(
                fn, f"{name} must have shape {want[name]} with total = {total}, D = {D}, got {tuple(x.shape)}"
            )
    nseq = _varlen_cu(fn, cu_seqlens, q.device)
    longest = _varlen_max(fn, cu_seqlens, total, max_seqlen)
    heads = max(x.shape[1] for x in named.values() if x is not None)
    views = {n: _unpack(x) for n, x in aux.items()}
    shape = None
    if total:  # _check needs a token; an empty batch (every sequence empty) has no outputs to check
        shape = _check(fn, _unpack(q), _unpack(k), _unpack(v), **views)  # type: ignore[arg-type]
    E = v.shape[2]
    if initial_state is not None:
        want_s = (nseq, heads, E, D)
        if tuple(initial_state.shape) != want_s or not initial_state.is_floating_point():
            raise _fail(
                fn,
                f"initial_state must be a float tensor [nseq, H, E, D] = {list(want_s)} (one state per "
                f"sequence), got {tuple(initial_state.shape)} {initial_state.dtype}",
            )
        if initial_state.device != q.device:
            raise _fail(fn, f"initial_state is on {initial_state.device} but q is on {q.device}")
    return _Packed(
        fn, _unpack(q), _unpack(k), _unpack(v), views, initial_state, _Seqs(cu_seqlens, nseq, total),  # type: ignore[arg-type]
        longest, shape, heads,
    )  # fmt: skip


def _varlen_finish(p: _Packed, o: torch.Tensor, sn: torch.Tensor, dtype: torch.dtype, return_state: bool):
    """o [1, H, total, E] → [total, H, E] in q's dtype; the states [nseq, H, E, D]."""
    o = o[0].transpose(0, 1).contiguous().to(dtype)
    return (o, sn) if return_state else o


def _varlen_empty(p: _Packed, dtype: torch.dtype, return_state: bool):
    """Every sequence empty (total = 0): no outputs; each state is its initial one."""
    E, D = p.v.shape[3], p.q.shape[3]
    o = p.q.new_zeros((0, p.heads, E), dtype=dtype)
    if p.s0 is not None:
        sn = p.s0.float() if p.s0.dtype != torch.float64 else p.s0
    else:
        sn = p.q.new_zeros((p.seqs.nseq, p.heads, E, D), dtype=torch.float32)
    return (o, sn) if return_state else o


def _varlen_reference(p: _Packed, k, v, g, a, b):
    """The reference of a packed batch: `dplr_reference` once per sequence on the host (reads cu_seqlens).
    Returns o [1, H, total, E] and the states [nseq, H, E, D]."""
    assert p.shape is not None
    cu = _varlen_offsets(p.fn, p.seqs.cu, p.seqs.total)
    ct = torch.float64 if any(x.dtype == torch.float64 for x in (p.q, k, v)) else torch.float32
    outs, states = [], []
    for s in range(len(cu) - 1):
        lo, hi = cu[s], cu[s + 1]
        s0 = None if p.s0 is None else p.s0[s : s + 1]
        if hi == lo:  # an empty sequence: no output rows; its state is its initial one
            zero = p.q.new_zeros((1, p.shape.H, p.shape.E, p.shape.D), dtype=ct)
            states.append(zero if s0 is None else s0.to(ct))
            continue
        one = [None if x is None else x[:, :, lo:hi] for x in (p.q, k, v, g, a, b)]
        o, st = dplr_reference(one[0], one[1], one[2], g=one[3], a=one[4], b=one[5], initial_state=s0)  # type: ignore[arg-type]
        outs.append(o)
        states.append(st)
    return torch.cat(outs, 2), torch.cat(states, 0)


def _packed_chunk(p: _Packed, k, v, beta, g, delta: bool, return_state: bool, config):
    """The chunk-parallel kernels on a packed batch (delta_chunk.ChunkTable: chunks start at each sequence's
    first token; forward and backward, no host synchronisation)."""
    assert p.shape is not None
    cfg = config or default_config(p.shape.D, p.shape.E)
    table = chunk_table(p.seqs.cu, p.seqs.total, cfg.chunk)
    o, sn = _ChunkFn.apply(
        p.q.contiguous(), k.contiguous(), v.contiguous(), _prep(beta), _prep(g), _state_in(p.s0),
        p.shape, cfg, delta, table,
    )  # fmt: skip
    return _varlen_finish(p, o, sn, p.q.dtype, return_state)


def _dplr_varlen_run(p: _Packed, k, v, g, a, b, alg: Algorithm, return_state: bool, config):
    assert p.shape is not None
    if alg is Algorithm.CHUNK:  # no rank-1 part (GLA)
        return _packed_chunk(p, k, v, None, g, False, return_state, config)
    if alg is Algorithm.REFERENCE:
        o, sn = _varlen_reference(p, k, v, g, a, b)
    else:
        cfg = config or default_config(p.shape.D, p.shape.E)
        o, sn = _RecurrentFn.apply(
            p.q.contiguous(), k.contiguous(), v.contiguous(), _prep(g), _prep(a), _prep(b), _state_in(p.s0),
            p.shape, cfg, p.seqs,
        )  # fmt: skip
    return _varlen_finish(p, o, sn, p.q.dtype, return_state)


def dplr_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    g: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
    algorithm: Algorithm | str = Algorithm.AUTO,
    config: DeltaConfig | None = None,
):
    """`dplr` on a packed batch of variable-length sequences: q [total, Hq, D], k [total, Hk, D],
    v [total, Hv, E], a, b [total, Ha, D], g [total, Hg] or [total, Hg, D]; cu_seqlens int32 [nseq + 1]
    (0, ..., total); initial_state and the returned state [nseq, H, E, D], one per sequence (each sequence
    starts from its own, or zeros). Returns o [total, H, E] (q's dtype), and the states with return_state=True.
    max_seqlen: None reads cu_seqlens on the host (one synchronisation for CUDA tensors, which also checks
    its values); the Triton kernels themselves never need it. algorithm: "recurrent", "reference" (the
    batched reference per sequence), "chunk" (without a rank-1 part: GLA) or "auto" (chunk without a rank-1
    part when the longest sequence has ≥ 64 tokens, else recurrent), as `dplr`."""
    fn = "dplr_varlen"
    alg = _algorithm(algorithm, fn)
    rank1 = a is not None or b is not None
    if alg is Algorithm.CHUNK and rank1:
        raise _fail(
            fn,
            "algorithm='chunk' covers the delta rule (delta_rule_varlen) and transitions without a rank-1 part "
            "(GLA); a general a bᵀ part runs with algorithm='recurrent'",
        )
    p = _varlen_setup(fn, q, k, v, cu_seqlens, max_seqlen, initial_state, g=g, a=a, b=b)
    if p.shape is None:
        return _varlen_empty(p, q.dtype, return_state)
    if alg is Algorithm.AUTO:
        alg = Algorithm.CHUNK if not rank1 and p.longest >= 64 else Algorithm.RECURRENT
    return _dplr_varlen_run(p, p.k, p.v, p.aux["g"], p.aux["a"], p.aux["b"], alg, return_state, config)


def gla_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
    algorithm: Algorithm | str = Algorithm.AUTO,
    config: DeltaConfig | None = None,
):
    """`gla` on a packed batch (shapes and conventions as `dplr_varlen`; g [total, Hg, D] or [total, Hg])."""
    if g is None:
        raise _fail("gla_varlen", "g (the log-decay, [total, Hg, D] or [total, Hg]) is required")
    return dplr_varlen(
        q, k, v, g=g, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, initial_state=initial_state,
        return_state=return_state, algorithm=algorithm, config=config,
    )  # fmt: skip


def delta_rule_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
    algorithm: Algorithm | str = Algorithm.AUTO,
    config: DeltaConfig | None = None,
):
    """`delta_rule` on a packed batch of variable-length sequences: q [total, Hq, D], k [total, Hk, D],
    v [total, Hv, E], beta [total, Hb], g absent (DeltaNet), [total, Hg] (Gated DeltaNet) or [total, Hg, D]
    (KDA); cu_seqlens, max_seqlen, the states and the output as `dplr_varlen`. algorithm: "chunk" (every gate
    form: the chunk-parallel kernels, forward and backward, with chunks starting at each sequence's first
    token), "recurrent", "reference" or "auto" (chunk when the longest sequence has ≥ 64 tokens, else
    recurrent)."""
    fn = "delta_rule_varlen"
    alg = _algorithm(algorithm, fn)
    if beta is None:
        raise _fail(fn, "beta (the writing strength, [total, Hb]) is required")
    p = _varlen_setup(fn, q, k, v, cu_seqlens, max_seqlen, initial_state, beta=beta, g=g)
    if p.shape is None:
        return _varlen_empty(p, q.dtype, return_state)
    if alg is Algorithm.AUTO:
        alg = Algorithm.CHUNK if p.longest >= 64 else Algorithm.RECURRENT
    H, gb, betab = p.shape.H, p.aux["g"], p.aux["beta"]
    if alg is not Algorithm.CHUNK:
        kp, vp, a, b = _delta_as_dplr(p.k, p.v, betab, gb, H)
        ge = None if gb is None else _expand_heads(gb, H)
        return _dplr_varlen_run(p, kp, vp, ge, a, b, alg, return_state, config)
    return _packed_chunk(p, p.k, p.v, betab, gb, True, return_state, config)


# ---------------------------------------------------------------------------------------------- generated modules
# What the entry points of `state` blocks (codegen/delta.py) call to evaluate their per-token inputs.


@dataclass(frozen=True)
class SpecGrid:
    """Index grids of a state block's per-token expressions: b, h, hk, i as [B, H, T, 1]-broadcastable
    aranges, d over the key channels and e over the value channels (last axis)."""

    b: torch.Tensor
    h: torch.Tensor
    hk: torch.Tensor
    i: torch.Tensor
    d: torch.Tensor
    e: torch.Tensor
    shape: tuple[int, int, int, int, int]  # B, H, T, D, E

    def __iter__(self):
        return iter((self.b, self.h, self.hk, self.i, self.d, self.e))


def spec_grid(B: int, H: int, G: int, T: int, D: int, E: int, device: torch.device) -> SpecGrid:
    def ar(n: int, axis: int) -> torch.Tensor:
        view = [1, 1, 1, 1]
        view[axis] = n
        return torch.arange(n, device=device).view(view)

    h = ar(H, 1)
    return SpecGrid(ar(B, 0), h, h // (H // G), ar(T, 2), ar(D, 3), ar(E, 3), (B, H, T, D, E))


def spec_grid_varlen(
    cu_seqlens: torch.Tensor, H: int, G: int, total: int, D: int, E: int, device: torch.device
) -> SpecGrid:
    """`spec_grid` of a packed batch seen as one [1, H, total] batch: b and i are each token's sequence number
    and position inside it (computed on the device: no host synchronisation)."""
    cu = cu_seqlens.long()
    tok = torch.arange(total, device=device)
    seq = torch.searchsorted(cu[1:], tok, right=True)
    grid = spec_grid(1, H, G, total, D, E, device)
    row = (1, 1, total, 1)
    return SpecGrid(seq.view(row), grid.h, grid.hk, (tok - cu[seq]).view(row), grid.d, grid.e, grid.shape)


def varlen_cu(fn: str, cu_seqlens: object, device: torch.device) -> int:
    """cu_seqlens' type, dtype, rank and device, checked without reading it (NAME_varlen); returns nseq."""
    return _varlen_cu(fn, cu_seqlens, device)


def packed_load(t: torch.Tensor, idx: tuple, axis: int, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """What a spec reads as x[b, ..., i, ...] (b: the sequence number, i at `axis`: the position inside it)
    of a tensor packed along the sequence ([total, ...]: the batched shape without B, the sequence axis
    first). Reads outside the sequence (i − 1 at its first token, say) give 0."""
    idx = torch.broadcast_tensors(*(torch.as_tensor(x, device=t.device) for x in idx))
    cu = cu_seqlens.long()
    seq = idx[0].clamp(0, cu.numel() - 2)
    pos = idx[axis]
    ok = (idx[0] >= 0) & (idx[0] < cu.numel() - 1) & (pos >= 0) & (pos < cu[seq + 1] - cu[seq])
    rest = [ix for j, ix in enumerate(idx) if j not in (0, axis)]
    for ix, n in zip(rest, t.shape[1:], strict=True):
        ok = ok & (ix >= 0) & (ix < n)
    row = torch.where(ok, cu[seq] + pos, 0)
    safe = tuple(torch.where(ok, ix, 0) for ix in rest)
    return torch.where(ok, t[(row, *safe)], 0)


def spec_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, H: int, G: int):
    """The token rows q [B, H, T, D], k [B, H, T, D], v [B, H, T, E] as the expressions read them: k and v
    at key/value head hk = h // (H / G), i.e. repeated over the query heads that share them."""
    return q, _expand_heads(k, H), _expand_heads(v, H)


def spec_input(x: torch.Tensor | float, kind: str, grid: SpecGrid) -> torch.Tensor:
    """A per-token input at its full shape: 'key' [B, H, T, D], 'value' [B, H, T, E], 'scalar' [B, H, T]."""
    B, H, T, D, E = grid.shape
    if not isinstance(x, torch.Tensor):  # a uniform expression: a Python number
        x = torch.tensor(float(x), dtype=torch.float32, device=grid.b.device)
    if kind == "scalar":
        return torch.broadcast_to(x, (B, H, T, 1))[..., 0]
    return torch.broadcast_to(x, (B, H, T, D if kind == "key" else E))
