"""Packed variable-length batches (FlashAttention's `flash_attn_varlen_func` convention) for the generated
`NAME_varlen` entry points.

q is [total_q, H, D], k and v are [total_k, G, D|E], and int32 offsets `cu_seqlens` ([nseq + 1], first 0,
non-decreasing, last the total) say where each sequence starts. In the spec, i and j are positions inside a
sequence and b is its number. The kernels index the packed tensors through a 4-D view of batch stride 0
(`packed_view`): each program adds its own sequence's start and works on that sequence only, so tiles never
mix sequences and nothing is padded. Per-token auxiliary tensors arrive packed too ([B, H, N] as [total, H])
and are laid out per sequence here ([nseq, H, max_seqlen]: small, no head dimension), so the kernels' and
the reference's indexing stays that of the batched call.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch


class Varlen(NamedTuple):
    """A varlen launch: the offsets of q's and of k's sequences, and the packed totals."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    total_q: int
    total_k: int


def packed_view(t, nseq, max_len):
    """[total, H, X] -> the [nseq, H, max_len, X] view the kernels index: batch stride 0 (each program moves
    to its sequence's start itself), rows along the packed axis. max_len <= total (`varlen_batch`)."""
    return t.as_strided((nseq, t.shape[1], max_len, t.shape[2]), (0, t.stride(1), t.stride(0), t.stride(2)))


def check_offsets(name, cu, device):
    """An offsets table's type, dtype, rank and device (no host synchronisation): the contiguous table.
    Every packed entry point checks its offsets here (softmax, linear and delta-rule families)."""
    if not isinstance(cu, torch.Tensor):
        raise ValueError(
            f"{name}: expected an int32 tensor [nseq + 1] of sequence offsets, got {type(cu).__name__}"
        )
    if cu.dtype is not torch.int32 or cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(
            f"{name}: expected an int32 tensor [nseq + 1] of sequence offsets, got {cu.dtype} of shape {list(cu.shape)}"
        )
    if cu.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where q is), got one on {cu.device}")
    return cu.contiguous()


def read_offsets(name, cu, total):
    """The offsets on the host (a synchronisation for CUDA tensors), checked: 0 first, never decreasing,
    `total` last (a bad table would read out of bounds)."""
    offs = cu.tolist()
    if offs[0] != 0 or offs[-1] != total or any(a > b for a, b in itertools.pairwise(offs)):
        shown = offs if len(offs) <= 12 else [*offs[:6], "...", *offs[-3:]]
        raise ValueError(
            f"{name}: offsets must start at 0, never decrease and end at the packed length {total}; got {shown}"
        )
    return offs


def sync_allowed(cu, must_read):
    """Whether a call may read its offsets on the host: where it must anyway (`must_read`: a max_seqlen not
    given) and for CPU tensors; never while torch.compile traces (a graph reads no data)."""
    if torch.compiler.is_compiling():
        return False
    return cu.device.type == "cpu" or must_read


def _packed(name, t, text, q):
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a packed tensor of shape {text}, got {got}")
    if t.device != q.device:
        raise ValueError(f"{name}: expected a tensor on {q.device} (where q is), got one on {t.device}")


def longest_sequence(name, cu, total, max_len, check):
    """The longest sequence (one host synchronisation when `max_len` is None) and, when `check`, the offsets'
    validity (`read_offsets`)."""
    if max_len is not None and (not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 0):
        raise ValueError(f"max_seqlen for {name}: expected a non-negative int, got {max_len!r}")
    if check or max_len is None:
        offs = read_offsets(name, cu, total)  # the only host synchronisation of a varlen call
        longest = max((b - a for a, b in itertools.pairwise(offs)), default=0)
        if max_len is None:
            max_len = longest
        elif max_len < longest:
            raise ValueError(f"max_seqlen for {name}: {max_len} is below the longest sequence, {longest}")
    return min(max_len, total)  # no sequence is longer than the packed total (and the views need it)


def varlen_batch(name, q, k, v, cu_q, cu_k, max_q, max_k, same_length):
    """Check a varlen call's packed tensors and offsets: (cu_q, cu_k, max_q, max_k). `same_length`: q and k
    share the spec's length symbol, so each sequence has as many keys as queries (one offsets table; a
    second one is compared with it where a synchronisation is allowed, and the first is used). The offsets
    are validated on the host when a max_seqlen is not given (that synchronises anyway) and always for CPU
    tensors; on CUDA with the max_seqlens given nothing synchronises and the offsets are trusted."""
    _packed("q", q, "[total_q, H, D]", q)
    _packed("k", k, "[total_k, G, D]", q)
    _packed("v", v, "[total_k, G, E]", q)
    if k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1]:
        raise ValueError(
            f"k, v: expected the same packed rows and heads, got {list(k.shape)} and {list(v.shape)}"
        )
    cu_q = check_offsets("cu_seqlens_q", cu_q, q.device)
    if cu_k is None:
        if not same_length:
            raise ValueError(
                f"cu_seqlens_k: {name} has separate query and key lengths, so it needs the keys' offsets too"
            )
        cu_k = cu_q
    else:
        cu_k = check_offsets("cu_seqlens_k", cu_k, q.device)
    if cu_k.shape[0] != cu_q.shape[0]:
        raise ValueError(
            f"cu_seqlens_k: expected {cu_q.shape[0]} offsets (as cu_seqlens_q: one sequence each), got {cu_k.shape[0]}"
        )
    if same_length and max_k is None:
        max_k = max_q  # as many keys as queries in every sequence
    # A synchronisation is allowed where one happens anyway (a max_seqlen to read) and on the CPU; a graph
    # being traced (torch.compile) reads no data: it needs the max_seqlens and trusts the offsets.
    missing = [n for n, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)) if m is None]
    if missing and torch.compiler.is_compiling():
        raise ValueError(
            f"{', '.join(missing)}: required under torch.compile (a traced graph cannot read the longest "
            "sequence from the offsets)"
        )
    check = sync_allowed(cu_q, bool(missing))
    if same_length and cu_k is not cu_q:
        if q.shape[0] != k.shape[0] or (check and not torch.equal(cu_q, cu_k)):
            raise ValueError(
                f"cu_seqlens_k: {name} gives queries and keys one length symbol, so cu_seqlens_k must equal "
                "cu_seqlens_q (pass cu_seqlens_k=None)"
            )
        cu_k = cu_q  # one table: the kernels read the same offsets for both
    max_q = longest_sequence("cu_seqlens_q", cu_q, q.shape[0], max_q, check)
    max_k = longest_sequence("cu_seqlens_k", cu_k, k.shape[0], max_k, check)
    return cu_q, cu_k, max_q, max_k


def varlen_unpack(name, t, cu, max_len, axis):
    """A per-token auxiliary tensor, packed ([total, rest...]: the batched shape without B, its sequence axis
    first), as the [nseq, ...] tensor of the batched call, its sequence axis (`axis` in the declared shape)
    max_len long; positions past a sequence's end hold 0 (no gradient reaches them)."""
    nseq = cu.shape[0] - 1
    pos = torch.arange(max_len, device=t.device)
    lens = (cu[1:] - cu[:-1]).to(torch.int64)
    valid = pos[None, :] < lens[:, None]  # [nseq, max_len]
    if t.shape[0] == 0:
        g = t.new_zeros((nseq, max_len, *t.shape[1:]))
    else:
        idx = torch.where(valid, cu[:-1, None].to(torch.int64) + pos[None, :], 0).clamp_(max=t.shape[0] - 1)
        g = t[idx]
        g = torch.where(
            valid.view(*valid.shape, *([1] * (t.dim() - 1))),
            g,
            torch.zeros((), dtype=t.dtype, device=t.device),
        )
    return g.movedim(1, axis)


def varlen_pack_rows(stat, cu, total):
    """[nseq, H, max_len] per-row values (the log-sum-exp) -> [total, H], packed like q."""
    t = torch.arange(total, device=stat.device)
    seq = torch.searchsorted(cu[1:].to(torch.int64), t, right=True)
    return stat[seq, :, t - cu[seq].to(torch.int64)]


def varlen_views(q, k, v, nseq, max_q, max_k):
    """Contiguous packed q, k, v and their kernel views (`packed_view`)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return (q, k, v), (packed_view(q, nseq, max_q), packed_view(k, nseq, max_k), packed_view(v, nseq, max_k))


def cut_to_sequence(a, kinds, s, lens):
    """Sequence s of an auxiliary tensor laid out per sequence: per axis, "b" cut to row s, "q" / "k" (a
    position axis) cut to that side's length `lens[side]`, None kept (the varlen and paged references)."""
    for dim, kind in enumerate(kinds):
        if kind == "b":
            a = a.narrow(dim, s, 1)
        elif kind is not None:
            a = a.narrow(dim, 0, lens[kind])
    return a


def varlen_reference(fn, args, axes, cu_q, cu_k, max_q, out_shape, lse_dtype):
    """The reference of a varlen call: the batched reference `fn` (returning o and lse, or lse None) per
    sequence, a host loop: the readable oracle, not the fast path. `args`: the block's arguments (q, k, v
    packed, auxiliary tensors laid out per sequence as `varlen_unpack` gives them, scalars); `axes`: per
    argument, "q" or "k" for a packed q or k/v (rows of q's or k's sequences), None (passed whole), or per
    axis "b" (cut to the sequence), "q" / "k" (positions, cut to the sequence's length) or None. Returns o
    (`out_shape`: [total_q, H, E]) and the row statistic [nseq, H, max_q] (-inf past a sequence's end)."""
    bounds = {"q": cu_q.tolist(), "k": cu_k.tolist()}
    heads = out_shape[1]
    outs, stats = [], []
    for s in range(len(bounds["q"]) - 1):
        lens = {side: offs[s + 1] - offs[s] for side, offs in bounds.items()}
        call = []
        for a, ax in zip(args, axes, strict=True):
            if ax in ("q", "k"):
                a = a[bounds[ax][s] : bounds[ax][s + 1]].transpose(0, 1).unsqueeze(0)
            elif ax is not None:
                a = cut_to_sequence(a, ax, s, lens)
            call.append(a)
        if lens["q"] == 0:  # nothing to compute (and a 0-row call is no oracle of anything)
            stats.append(torch.full((heads, max_q), float("-inf"), dtype=lse_dtype, device=cu_q.device))
            continue
        o, lse = fn(*call)
        outs.append(o[0].transpose(0, 1))
        row = (
            lse[0].to(lse_dtype)
            if lse is not None
            else torch.zeros((heads, lens["q"]), dtype=lse_dtype, device=o.device)
        )
        pad = torch.full((heads, max_q - lens["q"]), float("-inf"), dtype=lse_dtype, device=o.device)
        stats.append(torch.cat([row, pad], dim=1))
    q = args[axes.index("q")]
    o = torch.cat(outs, dim=0) if outs else q.new_zeros(out_shape)
    stat = torch.stack(stats) if stats else torch.zeros((0, heads, max_q), dtype=lse_dtype, device=q.device)
    return o, stat
