"""The generated PyTorch reference against independent oracles written here (never against generated code).

Oracles, per spec (see `SPECS`):
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention` with an explicit boolean mask or float bias
  (`attn_mask`), `scale=` passed explicitly, `enable_gqa=True` for grouped-query specs. Rows with no visible
  key are given an all-true mask row and zeroed afterwards (SDPA's own answer there is NaN or backend
  dependent); the generated output on those rows is separately checked to be exactly 0.
- `naive`: the formula from the paper: softmax of masked scores (a sink is an extra column), sigmoid of
  score + bias, linear attention as (phi(Q) phi(K)^T * mask * decay) V, sum-normalised where the spec says so.
- `recurrent`: linear attention in its recurrent (RNN) form, a running state S_i = lambda S_{i-1} + k_i v_i^T.
- `flex`: `torch.nn.attention.flex_attention.flex_attention` (eager, forward only) with a `score_mod` and a
  block mask from `create_block_mask(..., device="cpu")`; output epilogues and sinks are applied to its
  output using its log-sum-exp.

The autograd oracles (`sdpa`, `naive`) always run in float64 on the same (rounded) input values, so a float32
comparison measures the reference's own float32 error.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import attnc.runtime.reference
from attnc import codegen

SPEC_DIR = Path(__file__).resolve().parents[1] / "examples" / "specs"
NEG_INF = float("-inf")
F64 = torch.float64
DTYPES = [torch.float32, torch.float64]
_DT_NAME = {torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}

Args = dict[str, Any]  # parameter name -> tensor or Python scalar, in the generated signature's order


# --------------------------------------------------------------------------------------------------------------
# Tolerances. atol is relative to the largest |expected| of the compared tensor (floor 1): linear attention
# (norm = none) sums N unnormalised terms, so its outputs and gradients reach O(100).


@dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float


# Measured worst cases over all cases here (error / (max|expected| + |expected|)): float64 1.5e-15 (forward
# and gradients), float32 4.7e-7 forward and 5.7e-7 gradients, flex_attention float32 2.5e-7. The tolerances
# leave a margin of ~1000x (float64) and ~35x (float32).
FWD_TOL = {torch.float64: Tol(1e-12, 1e-12), torch.float32: Tol(2e-5, 2e-5)}
GRAD_TOL = {torch.float64: Tol(1e-12, 1e-12), torch.float32: Tol(2e-5, 2e-5)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: Tol, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected = expected.detach().to(F64)
    actual = actual.detach().to(F64)
    finite = expected[expected.isfinite()]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, atol=tol.atol * scale, rtol=tol.rtol, equal_nan=False, msg=lambda m: f"{what}: {m}"
    )


# --------------------------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class Case:
    spec: str
    M: int
    N: int
    D: int = 16
    dtype: torch.dtype = F64
    B: int = 2
    H: int = 4

    @property
    def info(self) -> SpecInfo:
        return SPECS[self.spec]

    @property
    def G(self) -> int:
        return 2 if self.info.gqa else self.H

    @property
    def E(self) -> int:
        return 24 if self.info.value_width else self.D

    def __str__(self) -> str:
        s = f"{self.spec}-B{self.B}-H{self.H}"
        if self.info.gqa:
            s += f"-G{self.G}"
        if self.info.cross:
            s += f"-M{self.M}"
        s += f"-N{self.N}-D{self.D}"
        if self.info.value_width:
            s += f"-E{self.E}"
        return s + "-" + _DT_NAME[self.dtype]


def _gen(case: Case | str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(zlib.crc32(str(case).encode()))
    return g


def _randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def make_args(case: Case) -> Args:
    """q, k, v and the spec's auxiliary tensors and scalars, in signature order, rounded to case.dtype."""
    g = _gen(case)
    info = case.info
    args: Args = {
        "q": _randn(g, case.B, case.H, case.M, case.D, scale=info.q_scale),
        "k": _randn(g, case.B, case.G, case.N, case.D),
        "v": _randn(g, case.B, case.G, case.N, case.E),
    }
    args.update(info.aux(case, g))
    return {n: a.to(case.dtype) if _is_float(a) else a for n, a in args.items()}


def _is_float(a: Any) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def grad_names(args: Args) -> list[str]:
    return [n for n, a in args.items() if _is_float(a)]


def leaves(args: Args, dtype: torch.dtype) -> Args:
    """Fresh leaf copies (float tensors in `dtype`, requiring grad)."""
    out: Args = {}
    for n, a in args.items():
        out[n] = a.detach().to(dtype).clone().requires_grad_(True) if _is_float(a) else a
    return out


# --------------------------------------------------------------------------------------------------------------
# Oracle building blocks (float64 tensors; no generated code)


def pos(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    """i as [M, 1] and j as [1, N] (0-based positions in q and in k/v)."""
    M, N = a["q"].shape[2], a["k"].shape[2]
    return torch.arange(M).view(M, 1), torch.arange(N).view(1, N)


def expand_heads(a: Args, t: torch.Tensor) -> torch.Tensor:
    """A [B, G, ...] key/value tensor as [B, H, ...]: query head h reads kv head h // (H // G)."""
    H, G = a["q"].shape[1], t.shape[1]
    return t[:, torch.arange(H) // (H // G)]


def qk(a: Args, q: torch.Tensor | None = None, k: torch.Tensor | None = None) -> torch.Tensor:
    q = a["q"] if q is None else q
    k = a["k"] if k is None else k
    return torch.einsum("bhmd,bhnd->bhmn", q, expand_heads(a, k))


def shape4(a: Args) -> tuple[int, int, int, int]:
    q, k = a["q"], a["k"]
    return q.shape[0], q.shape[1], q.shape[2], k.shape[2]


def naive_softmax(
    a: Args, score: torch.Tensor, mask: torch.Tensor | None, sink: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over the masked scores (and a sink column with no value), times V; rows with nothing to
    attend are 0 with log-sum-exp -inf."""
    shape = shape4(a)
    v = expand_heads(a, a["v"])
    score = score.expand(shape)
    s = score if mask is None else torch.where(mask.expand(shape), score, NEG_INF)
    if sink is not None:
        s = torch.cat([s, sink.expand(*shape[:3], 1)], dim=-1)
        v = torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[3])], dim=2)
    alive = (s > NEG_INF).any(-1, keepdim=True)
    s = torch.where(alive, s, 0.0)
    p = torch.softmax(s, dim=-1) * alive
    lse = torch.where(alive, torch.logsumexp(s, dim=-1, keepdim=True), NEG_INF).squeeze(-1)
    return p @ v, lse


def sdpa(
    a: Args,
    scale: float,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.scaled_dot_product_attention with an explicit bool mask / float bias; dead rows zeroed."""
    q = a["q"]
    k = a["k"] if k is None else k
    v = a["v"] if v is None else v
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    alive = None
    if mask is not None:
        mask = mask.expand(shape)
        alive = mask.any(-1, keepdim=True)
        mask = mask | ~alive  # a row with no visible key: let SDPA see all of it, then zero it below
    if bias is None:
        attn_mask = mask
    else:
        attn_mask = bias.expand(shape) if mask is None else torch.where(mask, bias.expand(shape), NEG_INF)
    o = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )
    return o if alive is None else o * alive


def phi(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def dscale(a: Args) -> float:
    return a["q"].shape[3] ** -0.5


# --------------------------------------------------------------------------------------------------------------
# Flex attention oracle helpers (forward only)


def flex(
    a: Args,
    scale: float,
    mask_mod: Callable[..., torch.Tensor] | None = None,
    score_mod: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    B, H, M, N = shape4(a)
    block_mask = None
    if mask_mod is not None:
        block_mask = create_block_mask(mask_mod, B, H, M, N, device="cpu")
    q, k, v = a["q"], a["k"], a["v"]
    o, aux = flex_attention(
        q,
        k,
        v,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
        return_aux=AuxRequest(lse=True),
    )
    return o, aux.lse


def _causal_mm(b: torch.Tensor, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    return j <= i


# --------------------------------------------------------------------------------------------------------------
# The specs: auxiliary inputs and oracles


Oracle = Callable[[Args], torch.Tensor]
LseOracle = Callable[[Args], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SpecInfo:
    norm: str
    aux: Callable[[Case, torch.Generator], Args]
    naive: Callable[[Args], tuple[torch.Tensor, torch.Tensor | None]]
    shapes: tuple[tuple[int, int], ...]  # (M, N)
    sdpa: Oracle | None = None
    flex: LseOracle | None = None
    recurrent: Oracle | None = None
    cross: bool = False  # q has its own length M
    gqa: bool = False  # k, v have G = H / 2 heads
    value_width: bool = False  # v has its own width E
    q_scale: float = 1.0

    @property
    def softmax(self) -> bool:
        return self.norm == "softmax"


N_SHAPES = ((37, 37), (77, 77), (129, 129))
MN_SHAPES = ((37, 77), (77, 37), (5, 129))


def _no_aux(case: Case, g: torch.Generator) -> Args:
    return {}


# alibi ------------------------------------------------------------------------------------------------------
def alibi_aux(case: Case, g: torch.Generator) -> Args:
    h = torch.arange(case.H, dtype=F64)
    return {"slopes": torch.exp2(-8 * (h + 1) / case.H) * (1 + 0.2 * _randn(g, case.H))}


def alibi_bias(a: Args) -> torch.Tensor:
    i, j = pos(a)
    return a["slopes"].view(-1, 1, 1) * (j - i)


def alibi_naive(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = pos(a)
    return naive_softmax(a, qk(a) * dscale(a) + alibi_bias(a), j <= i)


def alibi_sdpa(a: Args) -> torch.Tensor:
    M, N = shape4(a)[2:]
    return sdpa(a, dscale(a), torch.ones(M, N, dtype=torch.bool).tril(), alibi_bias(a))


def alibi_flex(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    slopes = a["slopes"]
    return flex(a, dscale(a), _causal_mm, lambda s, b, h, i, j: s + slopes[h] * (j - i))


# sliding_window (GQA) ------------------------------------------------------------------------------------------
def sliding_window_aux(case: Case, g: torch.Generator) -> Args:
    return {} if case.N == 129 else {"W": 13}  # the default (256) once: then the window spans everything


def sliding_window_mask(a: Args) -> torch.Tensor:
    M, N, W = a["q"].shape[2], a["k"].shape[2], a.get("W", 256)
    ones = torch.ones(M, N, dtype=torch.bool)
    return ones.tril() & ones.triu(-(W - 1))


def sliding_window_naive(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    return naive_softmax(a, qk(a) / math.sqrt(a["q"].shape[3]), sliding_window_mask(a))


def sliding_window_sdpa(a: Args) -> torch.Tensor:
    return sdpa(a, 1 / math.sqrt(a["q"].shape[3]), sliding_window_mask(a))


def sliding_window_flex(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    W = a.get("W", 256)
    return flex(a, 1 / math.sqrt(a["q"].shape[3]), lambda b, h, i, j: (j <= i) & (i - j < W))


# softcap --------------------------------------------------------------------------------------------------------
def softcap_aux(case: Case, g: torch.Generator) -> Args:
    return {"cap": 1.5}  # small against the scores (q is scaled up) so that tanh saturates


def softcap_naive(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    cap = a["cap"]
    return naive_softmax(a, cap * torch.tanh(qk(a) * dscale(a) / cap), None)


def softcap_flex(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    cap = a["cap"]
    return flex(a, dscale(a), None, lambda s, b, h, i, j: cap * torch.tanh(s / cap))


# document -------------------------------------------------------------------------------------------------------
def document_aux(case: Case, g: torch.Generator) -> Args:
    starts = torch.rand(case.B, case.N, generator=g) < 0.12  # documents of ragged lengths
    return {"doc": starts.cumsum(-1).to(torch.int32)}


def document_mask(a: Args) -> torch.Tensor:
    doc = a["doc"]
    M, N = a["q"].shape[2], a["k"].shape[2]
    same = doc[:, None, :, None] == doc[:, None, None, :]
    return same & torch.ones(M, N, dtype=torch.bool).tril()


def document_naive(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    return naive_softmax(a, qk(a) * dscale(a), document_mask(a))


def document_sdpa(a: Args) -> torch.Tensor:
    return sdpa(a, dscale(a), document_mask(a))


def document_flex(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    doc = a["doc"]
    return flex(a, dscale(a), lambda b, h, i, j: (doc[b, i] == doc[b, j]) & (j <= i))


# t5_bias --------------------------------------------------------------------------------------------------------
def t5_bias_aux(case: Case, g: torch.Generator) -> Args:
    if case.N == 129:  # the default R = 64 once
        return {"bias": _randn(g, case.H, 2 * 64 + 1)}
    return {"bias": _randn(g, case.H, 2 * 8 + 1), "R": 8}  # R = 8 makes the clamp bite


def t5_bias_bias(a: Args) -> torch.Tensor:
    i, j = pos(a)
    R = a.get("R", 64)
    return a["bias"][:, (j - i).clamp(-R, R) + R]


def t5_bias_naive(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    return naive_softmax(a, qk(a) * dscale(a) + t5_bias_bias(a), None)


def t5_bias_sdpa(a: Args) -> torch.Tensor:
    return sdpa(a, dscale(a), None, t5_bias_bias(a))


def t5_bias_flex(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    bias, R = a["bias"], a.get("R", 64)
    return flex(a, dscale(a), None, lambda s, b, h, i, j: s + bias[h, torch.clamp(j - i, -R, R) + R])


# sink -----------------------------------------------------------------------------------------------------------
def sink_aux(case: Case, g: torch.Generator) -> Args:
    return {"sinks": _randn(g, case.H, scale=2.0)}


def sink_naive(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = pos(a)
    return naive_softmax(a, qk(a) * dscale(a), j <= i, sink=a["sinks"].view(1, -1, 1, 1))


def sink_sdpa(a: Args) -> torch.Tensor:
    # The sink as one more key: k = 0 and v = 0 with bias sinks[h], visible from every row.
    B, H, M, N = shape4(a)
    k = torch.cat([a["k"], a["k"].new_zeros(B, H, 1, a["k"].shape[3])], dim=2)
    v = torch.cat([a["v"], a["v"].new_zeros(B, H, 1, a["v"].shape[3])], dim=2)
    mask = torch.ones(M, N + 1, dtype=torch.bool).tril()
    mask[:, N] = True
    bias = torch.cat([torch.zeros(H, M, N, dtype=F64), a["sinks"].view(H, 1, 1).expand(H, M, 1)], dim=-1)
    return sdpa(a, dscale(a), mask, bias, k=k, v=v)


def sink_flex(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = flex(a, dscale(a), _causal_mm)
    sink = a["sinks"].view(1, -1, 1).to(lse.dtype)
    total = torch.logaddexp(lse, sink)
    return o * torch.exp(lse - total).unsqueeze(-1), total


# sigmoid_attn ---------------------------------------------------------------------------------------------------
def sigmoid_attn_naive(a: Args) -> tuple[torch.Tensor, None]:
    N = a["k"].shape[2]
    return torch.sigmoid(qk(a) * dscale(a) - math.log(N)) @ a["v"], None


# moh_gate -------------------------------------------------------------------------------------------------------
def moh_gate_aux(case: Case, g: torch.Generator) -> Args:
    return {"gate": torch.sigmoid(_randn(g, case.B, case.H, case.M, scale=2.0))}


def moh_gate_naive(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = pos(a)
    o, lse = naive_softmax(a, qk(a) * dscale(a), j <= i)
    return o * a["gate"].unsqueeze(-1), lse


def moh_gate_sdpa(a: Args) -> torch.Tensor:
    M, N = shape4(a)[2:]
    return sdpa(a, dscale(a), torch.ones(M, N, dtype=torch.bool).tril()) * a["gate"].unsqueeze(-1)


def moh_gate_flex(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = flex(a, dscale(a), _causal_mm)
    return o * a["gate"].unsqueeze(-1).to(o.dtype), lse


# lightning (linear, decayed, unnormalised) ------------------------------------------------------------------------
def lightning_aux(case: Case, g: torch.Generator) -> Args:
    return {"decay": 0.02 + 0.3 * torch.rand(case.H, generator=g, dtype=F64)}


def lightning_naive(a: Args) -> tuple[torch.Tensor, None]:
    i, j = pos(a)
    causal = j <= i
    gap = torch.where(causal, i - j, 0)  # exp(-decay * (i - j)) only where j <= i
    decay = torch.exp(-a["decay"].view(-1, 1, 1) * gap) * causal
    return (qk(a, phi(a["q"]), phi(a["k"])) * decay) @ a["v"], None


def lightning_recurrent(a: Args) -> torch.Tensor:
    # S_i = exp(-decay) S_{i-1} + phi(k_i) v_i^T ; o_i = phi(q_i) S_i
    q, k, v = phi(a["q"]), phi(a["k"]), a["v"]
    lam = torch.exp(-a["decay"]).view(1, -1, 1, 1)
    state = q.new_zeros(q.shape[0], q.shape[1], q.shape[3], v.shape[3])
    outs = []
    for t in range(q.shape[2]):
        state = lam * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], state))
    return torch.stack(outs, dim=2)


# retention (RetNet eq. 5: (QK^T ⊙ D) V, D_nm = gamma^(n-m) on n >= m) ------------------------------------------
def retention_aux(case: Case, g: torch.Generator) -> Args:
    return {"gamma": 1 - 0.2 * torch.rand(case.H, generator=g, dtype=F64)}


def retention_naive(a: Args) -> tuple[torch.Tensor, None]:
    i, j = pos(a)
    causal = j <= i
    decay = torch.where(causal, a["gamma"].view(-1, 1, 1) ** torch.where(causal, i - j, 0), 0.0)
    return (qk(a) * dscale(a) * decay) @ a["v"], None


# gated_linear (cumulative log-decay g: weight exp(g_i - g_j) on j <= i) ---------------------------------------------
def gated_linear_aux(case: Case, g: torch.Generator) -> Args:
    gates = F.logsigmoid(_randn(g, case.B, case.H, case.N) + 2.0)
    return {"g": gates.cumsum(-1)}


def gated_linear_naive(a: Args) -> tuple[torch.Tensor, None]:
    i, j = pos(a)
    gc = a["g"]
    expo = torch.where(j <= i, gc[..., :, None] - gc[..., None, :], float("-inf"))
    return (qk(a) * dscale(a) * torch.exp(expo)) @ a["v"], None


# linear_bidir (Katharopoulos et al. eq. 6, every key) ---------------------------------------------------------------
def linear_bidir_naive(a: Args) -> tuple[torch.Tensor, None]:
    scores = qk(a, phi(a["q"]), phi(a["k"]))
    return (scores @ a["v"]) / (scores.sum(-1, keepdim=True) + LINEAR_EPS), None


# decay_abs (symmetric decay, no mask: kept quadratic) ---------------------------------------------------------------
def decay_abs_aux(case: Case, g: torch.Generator) -> Args:
    return {"decay": 0.05 + 0.3 * torch.rand(case.H, generator=g, dtype=F64)}


def decay_abs_naive(a: Args) -> tuple[torch.Tensor, None]:
    i, j = pos(a)
    return (qk(a) * dscale(a) * torch.exp(-a["decay"].view(-1, 1, 1) * (i - j).abs())) @ a["v"], None


# causal ---------------------------------------------------------------------------------------------------------
def causal_aux(case: Case, g: torch.Generator) -> Args:
    return {} if case.N == 37 else {"scale": 0.21}  # the default (D ** -0.5) once


def causal_scale(a: Args) -> float:
    return a.get("scale", dscale(a))


def causal_naive(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = pos(a)
    return naive_softmax(a, qk(a) * causal_scale(a), j <= i)


def causal_sdpa(a: Args) -> torch.Tensor:
    return F.scaled_dot_product_attention(a["q"], a["k"], a["v"], is_causal=True, scale=causal_scale(a))


def causal_flex(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    return flex(a, causal_scale(a), _causal_mm)


# cross ----------------------------------------------------------------------------------------------------------
def cross_naive(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    return naive_softmax(a, qk(a) * dscale(a), None)


def cross_sdpa(a: Args) -> torch.Tensor:
    return sdpa(a, dscale(a))


def cross_flex(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    return flex(a, dscale(a))


# decode (GQA, bottom-right causal) ------------------------------------------------------------------------------
def decode_mask(a: Args) -> torch.Tensor:
    M, N = shape4(a)[2:]
    return torch.ones(M, N, dtype=torch.bool).tril(N - M)  # query row i is position i + N - M


def decode_naive(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    return naive_softmax(a, qk(a) * dscale(a), decode_mask(a))


def decode_sdpa(a: Args) -> torch.Tensor:
    return sdpa(a, dscale(a), decode_mask(a))


def decode_flex(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    M, N = shape4(a)[2:]
    return flex(a, dscale(a), lambda b, h, i, j: j <= i + (N - M))


# key_padding (a batch element with no valid key) ---------------------------------------------------------------
def key_padding_aux(case: Case, g: torch.Generator) -> Args:
    lens = [0, case.N - 3, case.N, 1, case.N // 2][: case.B]
    return {"lens": torch.tensor(lens, dtype=torch.int64)}


def key_padding_mask(a: Args) -> torch.Tensor:
    N = a["k"].shape[2]
    return (torch.arange(N).view(1, N) < a["lens"].view(-1, 1)).view(a["lens"].shape[0], 1, 1, N)


def key_padding_naive(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    return naive_softmax(a, qk(a) * dscale(a), key_padding_mask(a))


def key_padding_sdpa(a: Args) -> torch.Tensor:
    return sdpa(a, dscale(a), key_padding_mask(a))


def key_padding_flex(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    lens = a["lens"]
    return flex(a, dscale(a), lambda b, h, i, j: j < lens[b])


# prefix_lm ------------------------------------------------------------------------------------------------------
def prefix_lm_aux(case: Case, g: torch.Generator) -> Args:
    return {} if case.N == 77 else {"P": 21}  # the default (16) once


def prefix_lm_mask(a: Args) -> torch.Tensor:
    M, N = shape4(a)[2:]
    P = a.get("P", 16)
    prefix = torch.zeros(M, N, dtype=torch.bool)
    prefix[:, :P] = True
    return torch.ones(M, N, dtype=torch.bool).tril() | prefix


def prefix_lm_naive(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    return naive_softmax(a, qk(a) * dscale(a), prefix_lm_mask(a))


def prefix_lm_sdpa(a: Args) -> torch.Tensor:
    return sdpa(a, dscale(a), prefix_lm_mask(a))


def prefix_lm_flex(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    P = a.get("P", 16)
    return flex(a, dscale(a), lambda b, h, i, j: (j <= i) | (j < P))


# chunked_local ----------------------------------------------------------------------------------------------------
def chunked_local_aux(case: Case, g: torch.Generator) -> Args:
    return {"C": 10} if case.N != 129 else {}  # the default (64) once


def chunked_local_mask(a: Args) -> torch.Tensor:
    M, N = shape4(a)[2:]
    C = a.get("C", 64)
    chunk_of_i = torch.arange(M).div(C, rounding_mode="floor")
    chunk_of_j = torch.arange(N).div(C, rounding_mode="floor")
    return (chunk_of_i.view(M, 1) == chunk_of_j.view(1, N)) & torch.ones(M, N, dtype=torch.bool).tril()


def chunked_local_naive(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    return naive_softmax(a, qk(a) * dscale(a), chunked_local_mask(a))


def chunked_local_sdpa(a: Args) -> torch.Tensor:
    return sdpa(a, dscale(a), chunked_local_mask(a))


def chunked_local_flex(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    C = a.get("C", 64)
    return flex(a, dscale(a), lambda b, h, i, j: (i // C == j // C) & (j <= i))


# relpos_table (data-dependent index) ------------------------------------------------------------------------------
RELPOS_K = 11


def relpos_table_aux(case: Case, g: torch.Generator) -> Args:
    dist = torch.randint(0, RELPOS_K, (case.B, case.N, case.N), generator=g)
    # Where the mask is false (j > i) the index is never read: put garbage there.
    garbage = torch.randint(-1000, 1000, (case.B, case.N, case.N), generator=g) * 97 + 10**6
    upper = torch.ones(case.N, case.N, dtype=torch.bool).triu(1)
    return {"table": _randn(g, case.H, RELPOS_K), "dist": torch.where(upper, garbage, dist)}


def relpos_table_bias(a: Args) -> torch.Tensor:
    M, N = shape4(a)[2:]
    dist = torch.where(torch.ones(M, N, dtype=torch.bool).tril(), a["dist"], 0)
    return a["table"][:, dist].permute(1, 0, 2, 3)  # [H, B, M, N] -> [B, H, M, N]


def relpos_table_naive(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = pos(a)
    return naive_softmax(a, qk(a) * dscale(a) + relpos_table_bias(a), j <= i)


def relpos_table_sdpa(a: Args) -> torch.Tensor:
    M, N = shape4(a)[2:]
    return sdpa(a, dscale(a), torch.ones(M, N, dtype=torch.bool).tril(), relpos_table_bias(a))


def relpos_table_flex(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    table, dist = a["table"], a["dist"].clamp(0, RELPOS_K - 1)  # flex reads masked entries too
    return flex(a, dscale(a), _causal_mm, lambda s, b, h, i, j: s + table[h, dist[b, i, j]])


# linear_elu (linear, sum-normalised) --------------------------------------------------------------------------------
LINEAR_EPS = 1e-6


def linear_elu_naive(a: Args) -> tuple[torch.Tensor, None]:
    i, j = pos(a)
    scores = qk(a, phi(a["q"]), phi(a["k"])) * (j <= i)
    return (scores @ a["v"]) / (scores.sum(-1, keepdim=True) + LINEAR_EPS), None


def linear_elu_recurrent(a: Args) -> torch.Tensor:
    # Katharopoulos et al. eq. 18-20: S_i = sum_{j<=i} phi(k_j) v_j^T, z_i = sum_{j<=i} phi(k_j).
    q, k, v = phi(a["q"]), phi(a["k"]), a["v"]
    S = torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), dim=2)
    z = torch.cumsum(k, dim=2)
    num = torch.einsum("bhnd,bhnde->bhne", q, S)
    return num / ((q * z).sum(-1, keepdim=True) + LINEAR_EPS)


# head_offset ----------------------------------------------------------------------------------------------------
def head_offset_aux(case: Case, g: torch.Generator) -> Args:
    return {"offset": _randn(g, case.H, case.E)}


def head_offset_naive(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = pos(a)
    o, lse = naive_softmax(a, qk(a) * dscale(a), j <= i)
    return o + a["offset"].view(1, *a["offset"].shape[:1], 1, -1), lse


def head_offset_sdpa(a: Args) -> torch.Tensor:
    M, N = shape4(a)[2:]
    return sdpa(a, dscale(a), torch.ones(M, N, dtype=torch.bool).tril()) + a["offset"].unsqueeze(1)


def head_offset_flex(a: Args) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = flex(a, dscale(a), _causal_mm)
    return o + a["offset"].unsqueeze(1).to(o.dtype), lse


SPECS: dict[str, SpecInfo] = {
    "alibi": SpecInfo("softmax", alibi_aux, alibi_naive, MN_SHAPES, alibi_sdpa, alibi_flex, cross=True),
    "sliding_window": SpecInfo(
        "softmax",
        sliding_window_aux,
        sliding_window_naive,
        N_SHAPES,
        sliding_window_sdpa,
        sliding_window_flex,
        gqa=True,
    ),
    "softcap": SpecInfo(
        "softmax", softcap_aux, softcap_naive, MN_SHAPES, None, softcap_flex, cross=True, q_scale=3.0
    ),
    "document": SpecInfo("softmax", document_aux, document_naive, N_SHAPES, document_sdpa, document_flex),
    "t5_bias": SpecInfo(
        "softmax", t5_bias_aux, t5_bias_naive, MN_SHAPES, t5_bias_sdpa, t5_bias_flex, cross=True
    ),
    "sink": SpecInfo("softmax", sink_aux, sink_naive, N_SHAPES, sink_sdpa, sink_flex),
    "sigmoid_attn": SpecInfo("sigmoid", _no_aux, sigmoid_attn_naive, N_SHAPES),
    "moh_gate": SpecInfo("softmax", moh_gate_aux, moh_gate_naive, N_SHAPES, moh_gate_sdpa, moh_gate_flex),
    "lightning": SpecInfo(
        "none", lightning_aux, lightning_naive, N_SHAPES, recurrent=lightning_recurrent, value_width=True
    ),
    "causal": SpecInfo("softmax", causal_aux, causal_naive, N_SHAPES, causal_sdpa, causal_flex),
    "retention": SpecInfo("none", retention_aux, retention_naive, N_SHAPES[:2], value_width=True),
    "gated_linear": SpecInfo("none", gated_linear_aux, gated_linear_naive, N_SHAPES[:2], value_width=True),
    "linear_bidir": SpecInfo("sum", _no_aux, linear_bidir_naive, N_SHAPES[:2], value_width=True),
    "decay_abs": SpecInfo("none", decay_abs_aux, decay_abs_naive, N_SHAPES[:2]),
    "cross": SpecInfo(
        "softmax", _no_aux, cross_naive, MN_SHAPES, cross_sdpa, cross_flex, cross=True, value_width=True
    ),
    "decode": SpecInfo(
        "softmax",
        _no_aux,
        decode_naive,
        ((5, 77), (37, 129), (77, 37)),
        decode_sdpa,
        decode_flex,
        cross=True,
        gqa=True,
    ),
    "key_padding": SpecInfo(
        "softmax",
        key_padding_aux,
        key_padding_naive,
        MN_SHAPES,
        key_padding_sdpa,
        key_padding_flex,
        cross=True,
    ),
    "prefix_lm": SpecInfo(
        "softmax", prefix_lm_aux, prefix_lm_naive, N_SHAPES, prefix_lm_sdpa, prefix_lm_flex
    ),
    "chunked_local": SpecInfo(
        "softmax", chunked_local_aux, chunked_local_naive, N_SHAPES, chunked_local_sdpa, chunked_local_flex
    ),
    "relpos_table": SpecInfo(
        "softmax", relpos_table_aux, relpos_table_naive, N_SHAPES, relpos_table_sdpa, relpos_table_flex
    ),
    "linear_elu": SpecInfo(
        "sum", _no_aux, linear_elu_naive, N_SHAPES, recurrent=linear_elu_recurrent, value_width=True
    ),
    "head_offset": SpecInfo(
        "softmax",
        head_offset_aux,
        head_offset_naive,
        N_SHAPES,
        head_offset_sdpa,
        head_offset_flex,
        value_width=True,
    ),
}


def test_every_example_spec_has_an_oracle() -> None:
    on_disk = {p.stem for p in SPEC_DIR.glob("*.attn")}
    assert on_disk == set(SPECS), (
        f"specs without an oracle: {on_disk - set(SPECS)}; stale: {set(SPECS) - on_disk}"
    )


# --------------------------------------------------------------------------------------------------------------
# Case lists


def _cases(
    specs: Callable[[SpecInfo], bool] = lambda s: True,
    dtypes: list[torch.dtype] = DTYPES,
    shapes: slice = slice(None),
    d80: bool = False,
) -> Iterator[Case]:
    for name, info in SPECS.items():
        if not specs(info):
            continue
        for dtype in dtypes:
            for M, N in info.shapes[shapes]:
                yield Case(name, M, N, dtype=dtype)
            if d80:
                M, N = info.shapes[1]
                yield Case(name, M, N, D=80, dtype=dtype)


def params(cases: Iterator[Case]) -> list[Any]:
    return [pytest.param(c, id=str(c)) for c in cases]


FORWARD_CASES = params(_cases(d80=True))
GRAD_CASES = params(
    [
        *_cases(dtypes=[F64], shapes=slice(0, 2)),
        *(
            Case(n, *SPECS[n].shapes[0], dtype=torch.float32)
            for n in (
                "alibi",
                "sink",
                "t5_bias",
                "key_padding",
                "decode",
                "lightning",
                "linear_elu",
                "sigmoid_attn",
            )
        ),
        Case("relpos_table", 77, 77, D=80),
    ]
)
FLEX_SPECS = [n for n, s in SPECS.items() if s.flex is not None]
FLEX_CASES = params(_cases(lambda s: s.flex is not None, shapes=slice(0, 2)))
LSE_CASES = params(_cases(lambda s: s.softmax, shapes=slice(0, 1)))
ONE_F64 = params(_cases(dtypes=[F64], shapes=slice(0, 1)))


# --------------------------------------------------------------------------------------------------------------
# Running the generated code and the oracles


def run_generated(mod: ModuleType, spec: str, args: Args, **kw: Any) -> Any:
    return getattr(mod, spec)(*args.values(), **kw)


def oracles(info: SpecInfo, *, autograd_only: bool = False) -> dict[str, Oracle]:
    out: dict[str, Oracle] = {"naive": lambda a: info.naive(a)[0]}
    if info.sdpa is not None:
        out["sdpa"] = info.sdpa
    if info.recurrent is not None and not autograd_only:
        out["recurrent"] = info.recurrent
    return out


def dead_rows(info: SpecInfo, args: Args) -> torch.Tensor | None:
    """[B, H, M] bool: rows with nothing to attend (softmax without a sink only), from the naive LSE."""
    if not info.softmax:
        return None
    _, lse = info.naive(leaves(args, F64))
    assert lse is not None
    return lse.detach() == NEG_INF


def grads(out: torch.Tensor, weights: torch.Tensor, args: Args, names: list[str]) -> list[torch.Tensor]:
    gs = torch.autograd.grad((out * weights.to(out.dtype)).sum(), [args[n] for n in names], allow_unused=True)
    return [torch.zeros_like(args[n]) if g_ is None else g_ for n, g_ in zip(names, gs, strict=True)]


# --------------------------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_matches_oracles(case: Case, compiled: Callable[[str], ModuleType]) -> None:
    args = make_args(case)
    info = case.info
    with torch.no_grad():
        o = run_generated(compiled(case.spec), case.spec, args)
    assert o.dtype == case.dtype and o.shape == (case.B, case.H, case.M, case.E)
    assert o.isfinite().all()
    a64 = {n: x.to(F64) if _is_float(x) else x for n, x in args.items()}
    for oracle_name, oracle in oracles(info).items():
        with torch.no_grad():
            expected = oracle(a64)
        assert_close(o, expected, FWD_TOL[case.dtype], f"{case} vs {oracle_name}")
    dead = dead_rows(info, args)
    if dead is not None and dead.any():
        assert (o[dead] == 0).all(), "rows with no visible key must be exactly 0"


def test_cases_cover_dead_rows_gqa_cross_and_ragged() -> None:
    """The case lists really contain what the oracles are meant to pin down."""
    cases = [p.values[0] for p in FORWARD_CASES]
    with_dead = {c.spec for c in cases if (d := dead_rows(c.info, make_args(c))) is not None and d.any()}
    assert {"key_padding", "decode"} <= with_dead
    assert any(c.G != c.H for c in cases) and any(c.M != c.N for c in cases)
    assert any(c.D == 80 for c in cases)
    assert all(c.N % 8 for c in cases), "N must be ragged"


@pytest.mark.parametrize("case", FLEX_CASES)
def test_forward_matches_flex_attention(case: Case, compiled: Callable[[str], ModuleType]) -> None:
    info = case.info
    assert info.flex is not None
    args = make_args(case)
    with torch.no_grad():
        o, lse = run_generated(compiled(case.spec), case.spec, args, return_lse=True)
        o_flex, lse_flex = info.flex(args)
    assert_close(o, o_flex, FWD_TOL[case.dtype], f"{case} vs flex_attention")
    assert_close(lse, lse_flex, FWD_TOL[case.dtype], f"{case} lse vs flex_attention")


def test_flex_covers_the_required_specs() -> None:
    required = {"alibi", "softcap", "sliding_window", "document", "t5_bias", "prefix_lm", "causal"}
    assert required <= set(FLEX_SPECS)


def test_lightning_sum_form_matches_recurrent_form() -> None:
    """The two independent linear-attention oracles agree (guards the oracles themselves)."""
    args = make_args(Case("lightning", 37, 37))
    assert_close(lightning_naive(args)[0], lightning_recurrent(args), FWD_TOL[F64], "lightning oracles")
    args = make_args(Case("linear_elu", 37, 37))
    assert_close(linear_elu_naive(args)[0], linear_elu_recurrent(args), FWD_TOL[F64], "linear_elu oracles")


# --------------------------------------------------------------------------------------------------------------
# Gradients


def check_grads(case: Case, mod: ModuleType, args: Args) -> None:
    info = case.info
    names = grad_names(args)
    assert {"q", "k", "v"} <= set(names)
    gen_args = leaves(args, case.dtype)
    o = run_generated(mod, case.spec, gen_args)
    weights = torch.randn(o.shape, generator=_gen(f"w-{case}"), dtype=F64)
    got = grads(o, weights, gen_args, names)
    for g_, n in zip(got, names, strict=True):
        assert g_.dtype == gen_args[n].dtype and g_.isfinite().all(), f"{case}: d/d{n} not finite"
    for oracle_name, oracle in oracles(info, autograd_only=True).items():
        ref_args = leaves(args, F64)
        want = grads(oracle(ref_args), weights, ref_args, names)
        for n, g_, w in zip(names, got, want, strict=True):
            assert_close(g_, w, GRAD_TOL[case.dtype], f"{case}: d/d{n} vs {oracle_name}")
    dead = dead_rows(info, args)
    if dead is not None and dead.any():
        dq = got[names.index("q")]
        assert (dq[dead] == 0).all(), "dead rows must have zero gradient w.r.t. q"


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients_match_oracles(case: Case, compiled: Callable[[str], ModuleType]) -> None:
    check_grads(case, compiled(case.spec), make_args(case))


# --------------------------------------------------------------------------------------------------------------
# Log-sum-exp


@pytest.mark.parametrize("case", LSE_CASES)
def test_lse_is_logsumexp_of_masked_scores(case: Case, compiled: Callable[[str], ModuleType]) -> None:
    args = make_args(case)
    with torch.no_grad():
        o, lse = run_generated(compiled(case.spec), case.spec, args, return_lse=True)
        o_plain = run_generated(compiled(case.spec), case.spec, args)
        _, want = case.info.naive({n: x.to(F64) if _is_float(x) else x for n, x in args.items()})
    assert want is not None
    assert lse.shape == (case.B, case.H, case.M)
    assert torch.equal(o, o_plain)
    dead = want == NEG_INF
    assert (lse[dead] == NEG_INF).all() and lse[~dead].isfinite().all()
    assert_close(lse[~dead], want[~dead], FWD_TOL[case.dtype], f"{case} lse")
    if case.spec == "key_padding":
        assert dead[0].all() and not dead[1:].any()
    # The LSE is differentiable: d(sum of w * lse over live rows) matches the oracle's.
    names = grad_names(args)
    weights = torch.randn(lse.shape, generator=_gen(f"lse-w-{case}"), dtype=F64) * ~dead
    gen_args = leaves(args, case.dtype)
    _, lse = run_generated(compiled(case.spec), case.spec, gen_args, return_lse=True)
    got = grads(torch.where(dead, 0.0, lse), weights, gen_args, names)
    ref_args = leaves(args, F64)
    _, want = case.info.naive(ref_args)
    assert want is not None
    for n, g_, w in zip(
        names, got, grads(torch.where(dead, 0.0, want), weights, ref_args, names), strict=True
    ):
        assert g_.isfinite().all()
        assert_close(g_, w, GRAD_TOL[case.dtype], f"{case}: d lse/d{n}")


@pytest.mark.parametrize("spec", ["sigmoid_attn", "lightning", "linear_elu"])
def test_return_lse_on_non_softmax_raises(spec: str, compiled: Callable[[str], ModuleType]) -> None:
    args = make_args(Case(spec, 37, 37))
    with pytest.raises(ValueError, match="return_lse"):
        run_generated(compiled(spec), spec, args, return_lse=True)


# --------------------------------------------------------------------------------------------------------------
# Chunked query rows under torch.utils.checkpoint


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("case", ONE_F64)
def test_chunked_rows_match_oracles(
    case: Case, rows: int, compiled: Callable[[str], ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = compiled(case.spec)
    # The chunked driver lives in the runtime library that every generated module imports.
    from attnc.runtime import reference as driver

    limit = 64 if rows == 1 else rows * case.B * case.H * case.N  # 64 < B*H*N: one row per chunk
    monkeypatch.setattr(driver, "_REF_CHUNK_ELEMENTS", limit)
    calls: list[int] = []
    real_checkpoint = driver.checkpoint

    def counting_checkpoint(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        return real_checkpoint(*a, **kw)

    monkeypatch.setattr(driver, "checkpoint", counting_checkpoint)
    args = make_args(case)
    check_grads(case, mod, args)
    assert len(calls) >= math.ceil(case.M / rows), "query-row chunks must run under torch.utils.checkpoint"
    with torch.no_grad():
        o = run_generated(mod, case.spec, args)
    assert_close(o, case.info.naive(leaves(args, F64))[0], FWD_TOL[F64], f"{case} chunked, no_grad")
    if case.info.softmax:
        with torch.no_grad():
            _, lse = run_generated(mod, case.spec, args, return_lse=True)
        want = case.info.naive(leaves(args, F64))[1]
        assert want is not None
        dead = want == NEG_INF
        assert (lse[dead] == NEG_INF).all()
        assert_close(lse[~dead], want[~dead], FWD_TOL[F64], f"{case} chunked lse")


# --------------------------------------------------------------------------------------------------------------
# Masked entries never leak NaN/inf


LEAK_NORMS = {
    "softmax": "softmax",
    "sigmoid": "sigmoid(bias = -1.0)",
    "none": "none",
    "sum": "sum(eps = 1e-3)",
}


def leak_source(norm: str) -> str:
    return (
        "attention logbias(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) {\n"
        "    score = dot(q, k) * D ** -0.5 + log(i - j)   # log of i - j <= 0 outside the mask\n"
        "    mask  = j < i\n"
        f"    norm  = {LEAK_NORMS[norm]}\n"
        "}\n"
    )


def leak_oracle(a: Args, norm: str) -> torch.Tensor:
    i, j = pos(a)
    mask = j < i
    score = qk(a) * dscale(a) + torch.log(torch.where(mask, i - j, 1).to(F64))
    if norm == "softmax":
        return naive_softmax(a, score, mask)[0]
    if norm == "sigmoid":
        return torch.where(mask, torch.sigmoid(score - 1.0), 0.0) @ a["v"]
    s = torch.where(mask, score, 0.0)
    if norm == "none":
        return s @ a["v"]
    return (s @ a["v"]) / (s.sum(-1, keepdim=True) + 1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=_DT_NAME.get)
@pytest.mark.parametrize("norm", list(LEAK_NORMS))
def test_masked_entries_never_leak_nan(
    norm: str, dtype: torch.dtype, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = codegen.compile_source(leak_source(norm), "x.attn", cache_dir=tmp_path_factory.mktemp("leak"))
    g = _gen(f"leak-{norm}")
    args: Args = {n: _randn(g, 2, 4, 37, 16).to(dtype) for n in "qkv"}
    for rows in (None, 3):  # whole and chunked
        if rows is not None:
            monkeypatch.setattr(attnc.runtime.reference, "_REF_CHUNK_ELEMENTS", rows * 2 * 4 * 37)
        gen_args = leaves(args, dtype)
        o = mod.logbias(*gen_args.values())
        assert o.isfinite().all()
        assert (o[:, :, 0] == 0).all(), "row 0 sees no key: its output is 0"
        weights = torch.randn(o.shape, generator=g, dtype=F64)
        got = grads(o, weights, gen_args, ["q", "k", "v"])
        ref_args = leaves(args, F64)
        want = grads(leak_oracle(ref_args, norm), weights, ref_args, ["q", "k", "v"])
        assert_close(o, leak_oracle(leaves(args, F64), norm), FWD_TOL[dtype], f"logbias/{norm} forward")
        for n, g_, w in zip("qkv", got, want, strict=True):
            assert g_.isfinite().all(), f"d/d{n} has NaN/inf"
            assert_close(g_, w, GRAD_TOL[dtype], f"logbias/{norm} d/d{n}")
        assert (got[0][:, :, 0] == 0).all()


# --------------------------------------------------------------------------------------------------------------
# Non-contiguous inputs


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (transposed storage, or a stride-2 view for 1-d)."""
    if t.dim() == 1:
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[:, 0]
    if t.dim() == 4:
        out = t.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if t.shape[-1] > 1 and t.shape[-2] > 1:
        assert not out.is_contiguous()
    return out


@pytest.mark.parametrize("case", ONE_F64)
def test_non_contiguous_inputs(case: Case, compiled: Callable[[str], ModuleType]) -> None:
    """Every tensor argument (q, k, v, float and int aux) as a non-contiguous view: same values, same grads."""
    mod = compiled(case.spec)
    args = make_args(case)
    names = grad_names(args)

    def run(layout: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaf: Args = {}
        for n, x in args.items():
            if isinstance(x, torch.Tensor):
                x = layout(x.detach().clone())
                leaf[n] = x.requires_grad_(True) if x.is_floating_point() else x
            else:
                leaf[n] = x
        if layout is strided_copy:
            assert not leaf["q"].is_contiguous() and not leaf["v"].is_contiguous()
        o = run_generated(mod, case.spec, leaf)
        return o, grads(o, torch.ones_like(o), leaf, names)

    o_cont, g_cont = run(lambda t: t)
    o_strided, g_strided = run(strided_copy)
    assert_close(o_strided, o_cont, FWD_TOL[F64], f"{case} strided vs contiguous")
    for n, g1, g0 in zip(names, g_strided, g_cont, strict=True):
        assert_close(g1, g0, GRAD_TOL[F64], f"{case} strided d/d{n}")
    assert_close(o_strided, case.info.naive(leaves(args, F64))[0], FWD_TOL[F64], f"{case} strided vs naive")


@pytest.mark.parametrize("spec", ["alibi", "sliding_window", "cross", "lightning", "t5_bias", "key_padding"])
def test_broadcast_views_stride_zero(spec: str, compiled: Callable[[str], ModuleType]) -> None:
    """k, v shared across the batch as expanded (stride-0) views, and the float aux tensors likewise."""
    mod = compiled(spec)
    info = SPECS[spec]
    case = Case(spec, *info.shapes[0])
    args = make_args(case)
    bases = {
        n: (args[n][:1] if n in "kv" else args[n]).detach().clone().requires_grad_(True)
        for n in grad_names(args)
    }

    def build(contiguous: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        a = dict(args)
        leaf = {n: b.detach().clone().requires_grad_(True) for n, b in bases.items()}
        for n, b in leaf.items():
            x = b.expand(args[n].shape) if n in "kv" else b
            a[n] = x.contiguous() if contiguous else x
        if not contiguous:
            assert a["k"].stride(0) == 0
        o = run_generated(mod, spec, a)
        return o, grads(o, torch.ones_like(o), leaf, list(leaf))

    o_view, g_view = build(False)
    o_cont, g_cont = build(True)
    assert_close(o_view, o_cont, FWD_TOL[F64], f"{spec} expanded vs contiguous")
    for n, a_, b_ in zip(bases, g_view, g_cont, strict=True):
        assert_close(a_, b_, GRAD_TOL[F64], f"{spec} expanded d/d{n}")


# --------------------------------------------------------------------------------------------------------------
# Calling conventions and call-time errors


def test_keyword_arguments_and_backend(compiled: Callable[[str], ModuleType]) -> None:
    mod = compiled("t5_bias")
    args = make_args(Case("t5_bias", 37, 77))
    with torch.no_grad():
        positional = mod.t5_bias(*args.values())
        keywords = mod.t5_bias(**args)
        ref = mod.t5_bias_reference(**args, return_lse=False)
        explicit = mod.t5_bias(*args.values(), backend="reference")
    assert (
        torch.equal(positional, keywords)
        and torch.equal(positional, ref)
        and torch.equal(positional, explicit)
    )


def test_defaults_match_explicit_scalars(compiled: Callable[[str], ModuleType]) -> None:
    args = make_args(Case("causal", 37, 37))
    assert "scale" not in args
    with torch.no_grad():
        o_default = compiled("causal").causal(*args.values())
        o_explicit = compiled("causal").causal(*args.values(), scale=16**-0.5)
    assert torch.equal(o_default, o_explicit)


def _err_args(spec: str, M: int = 37, N: int = 37) -> Args:
    return make_args(Case(spec, M, N, dtype=torch.float32))


def _with(spec: str, **changes: Any) -> tuple[str, Args]:
    info = SPECS[spec]
    args = _err_args(spec, 37, 77 if info.cross else 37)
    args.update(changes)
    return spec, args


def _bad_relpos(value: int, visible: bool) -> tuple[str, Args]:
    spec, args = _with("relpos_table")
    dist = args["dist"].clone()
    if visible:
        dist[1, 20, 3] = value  # j = 3 <= i = 20: read
    args["dist"] = dist
    return spec, args


B_, H_ = 2, 4
ERROR_CASES: list[Any] = [
    pytest.param(*_with("alibi", slopes=torch.randn(H_ + 1)), r"slopes: .*\[H\] = \[4\]", id="aux-shape"),
    pytest.param(*_with("alibi", k=torch.randn(B_, H_, 77, 15)), r"k: .*\[B, H, N, D\]", id="k-head-dim"),
    pytest.param(*_with("alibi", v=torch.randn(B_, H_, 76, 16)), r"v: .*\[B, H, N, D\]", id="v-length"),
    pytest.param(*_with("alibi", q=torch.randn(B_, H_, 37, 16, 1)), r"q: expected a 4-d tensor", id="q-rank"),
    pytest.param(*_with("alibi", slopes=torch.randn(1, H_)), r"slopes: expected a 1-d tensor", id="aux-rank"),
    pytest.param(*_with("t5_bias", bias=torch.randn(H_, 16)), r"bias: .*2 \* R \+ 1", id="expr-dim"),
    pytest.param(
        *_with("document", doc=torch.zeros(B_, 37)), r"doc: expected int32, got float32", id="int-aux-float"
    ),
    pytest.param(
        *_with("document", doc=torch.zeros(B_, 37, dtype=torch.int64)),
        r"doc: expected int32",
        id="int-aux-width",
    ),
    pytest.param(
        *_with("key_padding", lens=torch.zeros(B_, dtype=torch.bool)),
        r"lens: expected int64",
        id="int-aux-bool",
    ),
    pytest.param(
        *_with("alibi", k=torch.randn(B_, H_, 77, 16, dtype=F64)),
        r"k: expected float32, got float64",
        id="k-fp64",
    ),
    pytest.param(
        *_with("alibi", q=torch.zeros(B_, H_, 37, 16, dtype=torch.int64)), r"q: expected a float", id="q-int"
    ),
    pytest.param(
        *_with("alibi", slopes=torch.zeros(H_, dtype=torch.int32)), r"slopes: expected a float", id="aux-int"
    ),
    pytest.param(*_with("alibi", v=[[0.0]]), r"v: expected a tensor", id="v-list"),
    pytest.param(*_with("alibi", slopes=0.5), r"slopes: expected a tensor", id="aux-float"),
    pytest.param(*_with("alibi", slopes=torch.empty(H_, device="meta")), r"slopes: .*cpu", id="aux-device"),
    pytest.param(*_with("sliding_window", W=True), r"W: expected a Python int", id="bool-int-scalar"),
    pytest.param(*_with("sliding_window", W=3.0), r"W: expected a Python int", id="float-int-scalar"),
    pytest.param(*_with("softcap", cap="50"), r"cap: expected a Python float", id="str-float-scalar"),
    pytest.param(*_with("softcap", cap=False), r"cap: expected a Python float", id="bool-float-scalar"),
    pytest.param(
        *_with("sliding_window", k=torch.randn(B_, 3, 37, 16), v=torch.randn(B_, 3, 37, 16)),
        r"divide",
        id="gqa-3-of-4",
    ),
    pytest.param(*_bad_relpos(RELPOS_K, True), r"dist|table", id="relpos-index-high"),
    pytest.param(*_bad_relpos(-1, True), r"dist|table", id="relpos-index-negative"),
]


@pytest.mark.parametrize(("spec", "args", "pattern"), ERROR_CASES)
def test_call_time_errors(spec: str, args: Args, pattern: str, compiled: Callable[[str], ModuleType]) -> None:
    with pytest.raises(ValueError, match=pattern):
        run_generated(compiled(spec), spec, args)


def test_relpos_index_checked_only_where_the_mask_holds(compiled: Callable[[str], ModuleType]) -> None:
    spec, args = _bad_relpos(10**9, visible=False)
    assert (args["dist"] < 0).any() or (args["dist"] >= RELPOS_K).any()
    with torch.no_grad():
        o = run_generated(compiled(spec), spec, args)
    assert o.isfinite().all()


@pytest.mark.parametrize("backend", ["nope", "REFERENCE", ""])
def test_unknown_backend(backend: str, compiled: Callable[[str], ModuleType]) -> None:
    args = _err_args("causal")
    with pytest.raises(ValueError, match="backend"):
        compiled("causal").causal(*args.values(), backend=backend)


def test_error_cases_are_otherwise_valid(compiled: Callable[[str], ModuleType]) -> None:
    """The unmodified argument sets used by the error cases run (so each error is caused by its one change)."""
    for spec in ("alibi", "t5_bias", "document", "key_padding", "sliding_window", "softcap", "relpos_table"):
        _, args = _with(spec)
        with torch.no_grad():
            assert run_generated(compiled(spec), spec, args).isfinite().all()


@pytest.mark.parametrize("spec", ["cross", "key_padding"])
def test_empty_key_sequence_is_fully_masked(spec: str, compiled: Callable[[str], ModuleType]) -> None:
    args = make_args(Case(spec, 5, 37))
    args["k"], args["v"] = args["k"][:, :, :0], args["v"][:, :, :0]
    if spec == "key_padding":
        args["lens"] = torch.zeros_like(args["lens"])
    o, lse = run_generated(compiled(spec), spec, args, return_lse=True)
    assert o.shape == (2, 4, 5, args["v"].shape[3]) and (o == 0).all()
    assert (lse == NEG_INF).all()


def test_replace_keeps_ids_readable() -> None:
    case = Case("alibi", 37, 77, dtype=torch.float32)
    assert str(case) == "alibi-B2-H4-M37-N77-D16-fp32"
    assert str(replace(case, spec="sliding_window", M=77, N=77)) == "sliding_window-B2-H4-G2-N77-D16-fp32"


def test_undefined_size_and_scalar_expressions_name_the_inputs(compiled: Callable[[str], ModuleType]) -> None:
    x = torch.randn(1, 2, 5, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"chunked_local: .*division by zero.*C=0"):
        compiled("chunked_local").chunked_local(x, x, x, 0)  # i // C with C = 0, inside the kernel's math
    empty = x[:, :, :0]
    with pytest.raises(ValueError, match=r"sigmoid_attn: .*undefined.*'N': 0"):
        compiled("sigmoid_attn").sigmoid_attn(empty, empty, empty)  # bias = -log(N) with N = 0
