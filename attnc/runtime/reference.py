"""The exact PyTorch reference: `_attend`, the chunked driver every generated `NAME_reference` calls with
the spec's expressions as closures (`_Spec`), and the broadcasting helpers those closures use."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from .checks import _eval_error

_REF_CHUNK_ELEMENTS = 1 << 22  # score entries per query-row chunk: bounds memory in forward and backward
_NEG_INF = float("-inf")


def _sigmoid_scalar(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _full(x, shape, like):
    """Broadcast a (possibly Python-scalar) value to `shape` in like's dtype/device."""
    if not isinstance(x, torch.Tensor):
        x = torch.tensor(x, dtype=like.dtype, device=like.device)
    elif x.dtype is not torch.bool:
        x = x.to(like.dtype)
    return x.broadcast_to(shape)


def _full_bool(x, shape, device):
    if not isinstance(x, torch.Tensor):
        x = torch.tensor(bool(x), device=device)
    return x.broadcast_to(shape)


class _Spec(NamedTuple):
    """The expressions of one attention variant, as functions of the index variables."""

    norm: str  # "softmax" | "sigmoid" | "none" | "sum"
    score: object  # (b, h, hk, i, j, qk) -> score
    mask: object = None  # (b, h, hk, i, j) -> bool
    sink: object = None  # (b, h, hk, i) -> extra softmax logit
    bias: object = None  # (b, h, hk, i, j) -> sigmoid bias
    eps: object = None  # (b, h, hk, i) -> sum normaliser epsilon
    output: object = None  # (o, b, h, hk, i, e) -> output epilogue
    feature_q: object = None  # (q, b, h, hk, i, d) -> feature map
    feature_k: object = None  # (k, b, hk, j, d) -> feature map
    # The tile plan on the host: (m0, bm) -> ((lo, hi), ...), the key positions queries [m0, m0 + bm) may see
    # (None: any); and the per-tile summaries of data-dependent mask terms (as in `_TritonSpec`). Context
    # parallelism schedules its steps from them (attnc.distributed).
    keys: object = None
    summaries: tuple = ()


def _clamp(x, min=None, max=None):
    """torch.clamp with Python-number bounds that may lie beyond x's dtype (1e39 for float32), which torch
    refuses: such a bound acts as the infinity of its sign, as it would after rounding to the dtype."""
    if x.is_floating_point():
        big = torch.finfo(x.dtype).max
        min = min if min is None or abs(min) <= big else math.copysign(math.inf, min)
        max = max if max is None or abs(max) <= big else math.copysign(math.inf, max)
    return torch.clamp(x, min=min, max=max)


def _to_int(x):
    """floor/ceil's float result as an int tensor; a non-finite value has no integer: an error naming the cause
    (the kernels do not check it: outside the contract, docs/language.md)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            "the spec's expressions are undefined for these inputs (floor or ceil of inf or NaN)"
        )
    return x.long()


def _reference_run(name, spec, context, q, k, v, return_lse):
    """A generated `NAME_reference`'s call: `_attend` in float32 (float64 for float64 inputs), the output back
    in q's dtype; an integer division by zero in the spec's expressions (which torch reports as a
    RuntimeError) becomes the ValueError of `_eval_error`, with `context` (sizes and scalars)."""
    cdt = torch.float64 if q.dtype is torch.float64 else torch.float32
    try:
        o, lse = _attend(q.to(cdt), k.to(cdt), v.to(cdt), spec, return_lse)
    except RuntimeError as err:
        if "ZeroDivisionError" not in str(err):
            raise
        raise _eval_error(name, err, context) from None
    o = o.to(q.dtype)
    return (o, lse) if return_lse else o


def _attend(q, k, v, spec, return_lse, positions=(0, 0)):
    """Exact attention over query-row chunks; `spec` holds the variant's expressions.

    q: [B, H, M, D], k: [B, G, N, D], v: [B, G, N, E], already in the compute dtype. `positions`: the
    positions i and j of q's and k's first rows (context parallelism: global positions of local shards).
    Returns o: [B, H, M, E] and, for softmax, lse: [B, H, M].
    """
    q_pos, k_pos = positions
    B, H, M, _ = q.shape
    G, N, E = k.shape[1], k.shape[2], v.shape[3]
    rep = H // G if G else 1  # no heads at all (H = G = 0): an empty result, below
    dev = q.device
    if spec.feature_q is not None:
        b = torch.arange(B, device=dev).view(B, 1, 1, 1)
        h = torch.arange(H, device=dev).view(1, H, 1, 1)
        i = (q_pos + torch.arange(M, device=dev)).view(1, 1, M, 1)
        d = torch.arange(q.shape[3], device=dev).view(1, 1, 1, -1)
        q = _full(spec.feature_q(q, b, h, h // rep, i, d), q.shape, q)
    if spec.feature_k is not None:
        b = torch.arange(B, device=dev).view(B, 1, 1, 1)
        hk = torch.arange(G, device=dev).view(1, G, 1, 1)
        j = (k_pos + torch.arange(N, device=dev)).view(1, 1, N, 1)
        d = torch.arange(k.shape[3], device=dev).view(1, 1, 1, -1)
        k = _full(spec.feature_k(k, b, hk, j, d), k.shape, k)
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)

    def rows(qc, i0):
        mc = qc.shape[2]
        shape = (B, H, mc, N)
        b = torch.arange(B, device=dev).view(B, 1, 1, 1)
        h = torch.arange(H, device=dev).view(1, H, 1, 1)
        i = (q_pos + i0 + torch.arange(mc, device=dev)).view(1, 1, mc, 1)
        j = (k_pos + torch.arange(N, device=dev)).view(1, 1, 1, N)
        qk = torch.matmul(qc, k.transpose(-1, -2))
        if spec.mask is None:
            idx = None
            s = _full(spec.score(b, h, h // rep, i, j, qk), shape, qk)
        else:
            # The score is evaluated only where the mask holds: gather those entries, evaluate, scatter back.
            idx = _full_bool(spec.mask(b, h, h // rep, i, j), shape, dev).nonzero(as_tuple=True)
            bi, hi, ii, ji = idx
            s = _full(spec.score(bi, hi, hi // rep, ii + i0 + q_pos, ji + k_pos, qk[idx]), bi.shape, qk)
        lse = None
        if spec.norm == "softmax":
            if idx is not None:
                s = qk.new_full(shape, _NEG_INF).index_put(idx, s)
            # Row maxima; with no keys at all (N == 0) every row is fully masked.
            m = s.detach().amax(-1, keepdim=True) if N > 0 else qk.new_full((B, H, mc, 1), _NEG_INF)
            sink = None
            if spec.sink is not None:
                sink = _full(spec.sink(b, h, h // rep, i), (B, H, mc, 1), qk)
                m = torch.maximum(m, sink.detach())
            m = torch.where(m == _NEG_INF, torch.zeros_like(m), m)
            p = torch.exp(s - m)
            denom = p.sum(-1, keepdim=True)
            if sink is not None:
                denom = denom + torch.exp(sink - m)
            # Empty only when no key took weight; a NaN (from a NaN or ±Inf score) stays NaN in o and the LSE,
            # as in the Triton kernels (`l == 0` there too), rather than turning into an empty row.
            dead = denom == 0
            safe = torch.where(dead, torch.ones_like(denom), denom)
            o = torch.matmul(p, v) / safe
            lse = torch.where(dead, torch.full_like(m, _NEG_INF), m + torch.log(safe)).squeeze(-1)
        else:
            if spec.norm == "sigmoid":
                if idx is None:
                    bias = spec.bias(b, h, h // rep, i, j) if spec.bias is not None else 0.0
                else:
                    bias = (
                        spec.bias(bi, hi, hi // rep, ii + i0 + q_pos, ji + k_pos)
                        if spec.bias is not None
                        else 0.0
                    )
                s = torch.sigmoid(s + bias)
            if idx is not None:
                s = qk.new_zeros(shape).index_put(idx, s)
            o = torch.matmul(s, v)
            if spec.norm == "sum":
                eps = spec.eps(b, h, h // rep, i) if spec.eps is not None else 0.0
                denom = _full(s.sum(-1, keepdim=True) + eps, (B, H, mc, 1), qk)
                alive = denom != 0
                o = torch.where(
                    alive, o / torch.where(alive, denom, torch.ones_like(denom)), torch.zeros_like(o)
                )
        if spec.output is not None:
            e = torch.arange(E, device=dev).view(1, 1, 1, E)
            o = _full(spec.output(o, b, h, h // rep, i, e), o.shape, o)
        return (o, lse) if lse is not None else (o,)

    chunk = max(1, _REF_CHUNK_ELEMENTS // max(1, B * H * N))
    pieces = []
    for i0 in range(0, M, chunk):
        qc = q[:, :, i0 : i0 + chunk]
        if M > chunk and torch.is_grad_enabled():
            # Recompute each chunk in backward so at most one chunk of scores is alive at a time.
            pieces.append(checkpoint(rows, qc, i0, use_reentrant=False))
        else:
            pieces.append(rows(qc, i0))
    o = torch.cat([p[0] for p in pieces], dim=2) if pieces else q.new_zeros(B, H, 0, E)
    if spec.norm != "softmax" or not return_lse:
        return o, None
    lse = torch.cat([p[1] for p in pieces], dim=2) if pieces else q.new_zeros(B, H, 0)
    return o, lse
