"""Context parallelism for the linear family: chunked state passing across ranks.

A linear-form block's output at position i reads the sequence only through the state carried into i's
chunk: S(t) = Σ_{j ≤ t} e^{G_t − G_j} k~_j v_jᵀ (and its normaliser z for norm = sum). Over chunks in global
order, S(end of chunk c) = e^{G(end_c) − G(end_{c−1})} · S(end of chunk c−1) + S_c, where S_c is the chunk's own
state (zero initial state): an associative scan over (transfer, state) pairs. So every rank

1. runs its chunks with a zero initial state and `return_state`, `return_log_decay` (the chunk's state
   contribution S_c and G at its ends, from which the transfer exp(G(end) − G(start − 1)) follows),
2. all-gathers the small per-chunk (S_c, G) ([B, H, D, E] per chunk, one differentiable collective),
3. scans them in global order on every rank (2R chunks at most: a few tensor ops), and
4. reruns each of its chunks with its incoming state (initial_state, and initial_log_decay: G at the
   chunk's start − 1, which the previous chunk's owner computed) for the output.

Why a rerun and not a correction term added to the zero-state output: the output is linear in the incoming
state only before the norm = sum division and the output epilogue, which the generated function applies;
the rerun needs nothing but the public generated API and is exact for every linear-form spec (the chunk of
global position 0, whose incoming state is zero, is not rerun). It costs a second forward of the local
chunks; the state pass is the cheap part of the chunked algorithm, so a state-only first pass would halve
that (left for later). Bidirectional blocks (no causal mask) combine the total of the other chunks' states
instead of a prefix.

Gradients: the gathered states carry the summed gradient back to their owners (`comm.all_gather_grad`), and
replicated learned inputs (decay rates, gammas) sum their gradient over ranks (`comm.replicated`), so every
gradient matches the single-process full-sequence call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from attnc.runtime.attention_op import block_axes

from .comm import agree, all_gather_grad, replicated, world_of
from .shards import Chunk, Sharding

_ALGORITHMS = ("chunk", "recurrent")


class _Tie(torch.autograd.Function):
    """o unchanged, with `t` as a second input whose gradient is zero: every rank's backward then reaches the
    gathered states' collective, also a rank whose output reads no other chunk (the first chunk's owner)."""

    @staticmethod
    def forward(ctx, o, t):  # type: ignore[no-untyped-def]
        ctx.meta = (t.shape, t.dtype, t.device)
        return o.view_as(o)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        shape, dtype, device = ctx.meta
        return g, torch.zeros(shape, dtype=dtype, device=device)


def _world(group, sharding: Sharding) -> tuple[int, int, bool]:  # type: ignore[no-untyped-def]
    """(rank, world, communicate): a one-rank sharding runs without a process group."""
    if sharding.world == 1 and group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1, False
    rank, world = world_of(group)
    return rank, world, world > 1


def _seq_axes(linear_fn: Callable[..., Any], nargs: int) -> list[tuple[int, ...] | None]:
    """Per argument of `linear_fn` (a generated NAME_linear): its sequence axes, or None for a tensor passed
    whole (replicated); from the axis roles the module's block registered."""
    name = getattr(linear_fn, "__name__", "")
    file = getattr(linear_fn, "__globals__", {}).get("__file__")
    axes = None
    if name.endswith("_linear") and file is not None:
        try:
            axes = block_axes(file, name.removesuffix("_linear"))
        except KeyError:
            axes = None
    if axes is None:
        raise ValueError(
            f"linear_context_parallel: {name or linear_fn!r} is not the NAME_linear of a generated module "
            "whose q and k share their sequence length"
        )
    if len(axes) != nargs:
        raise ValueError(
            f"linear_context_parallel: {name} takes {len(axes)} arguments (q, k, v, *aux); got {nargs}"
        )
    out: list[tuple[int, ...] | None] = []
    for ax in axes:
        if ax in ("q", "k"):
            out.append((2,))
        elif isinstance(ax, tuple):
            seq = tuple(a for a, role in enumerate(ax) if role in ("q", "k"))
            out.append(seq or None)
        else:
            out.append(None)
    return out


def _shape_key(args: Sequence[Any]) -> list[int]:
    """Every tensor argument's rank and shape, flattened (what all ranks must agree on)."""
    key: list[int] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key += [a.dim(), *a.shape]
        else:
            key.append(-1)
    return key


def _check_local(
    args: Sequence[Any], seq: list[tuple[int, ...] | None], sharding: Sharding, world: int
) -> None:
    if sharding.world != world:
        raise ValueError(
            f"linear_context_parallel: sharding.world = {sharding.world}, the group has {world} ranks"
        )
    q, k, v = args[:3]
    for nm, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"linear_context_parallel: {nm} must be a [B, H, S_local, D|E] tensor")
    for n, (a, axes) in enumerate(zip(args, seq, strict=True)):
        for ax in axes or ():
            if a.shape[ax] != sharding.shard:
                what = ("q", "k", "v")[n] if n < 3 else f"argument {n}"
                raise ValueError(
                    f"linear_context_parallel: {what} holds {a.shape[ax]} positions along axis {ax}; the sharding "
                    f"gives every rank {sharding.shard} ({sharding.layout.value}, {sharding.world} ranks)"
                )


def _chunk_args(args: Sequence[Any], seq: list[tuple[int, ...] | None], c: Chunk, pieces: int) -> list[Any]:
    if pieces == 1:
        return list(args)
    out = []
    for a, axes in zip(args, seq, strict=True):
        for ax in axes or ():
            a = a.narrow(ax, c.local, c.length)
        out.append(a)
    return out


def linear_context_parallel(
    linear_fn: Callable[..., Any],
    args: Sequence[Any],
    *,
    group: Any,
    sharding: Sharding,
    backend: str,
    algorithm: str = "chunk",
) -> torch.Tensor:
    """This rank's output shard [B, H, S_local, E] of `linear_fn` (a generated module's NAME_linear) over a
    sequence sharded across `group` as `sharding` describes (see the module docstring).

    args: this rank's (q, k, v, *aux): q, k, v [B, H, S_local, D|E] and the per-position auxiliary tensors
    sharded along their sequence axes; replicated auxiliary tensors (decay [H], ...) and scalars whole on
    every rank. i and j in the spec are global positions. Differentiable in every input; replicated learned
    inputs get the gradient summed over ranks. Every rank must pass the same shapes: a mismatch raises the
    same ValueError on every rank (one collective, no hang). group=None: the default group (a one-rank
    sharding needs none)."""
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r}: the context-parallel linear forms are {_ALGORITHMS}")
    if not isinstance(sharding, Sharding):
        raise ValueError(f"sharding: expected an attnc.distributed.Sharding, got {type(sharding).__name__}")
    args = tuple(args)
    rank, world, comm = _world(group, sharding)
    seq = _seq_axes(linear_fn, len(args))
    if comm:  # before any local check: a rank that raised alone would leave the others in a collective
        layout = 1 if sharding.pieces == 2 else 0
        what = "the shard shapes ([layout, world, shard length], then each argument's rank and shape)"
        agree([layout, sharding.world, sharding.shard, *_shape_key(args)], group, what)
    _check_local(args, seq, sharding, world)
    causal = getattr(linear_fn, "causal", True)
    # Replicated learned inputs: every rank's loss reads them, so their gradient sums over ranks.
    if comm:
        args = tuple(
            replicated(a, group) if isinstance(a, torch.Tensor) and s is None and n >= 3 else a
            for n, (a, s) in enumerate(zip(args, seq, strict=True))
        )
    kw = dict(algorithm=algorithm, backend=backend)
    mine = sharding.chunks(rank)
    pieces = [_chunk_args(args, seq, c, len(mine)) for c in mine]

    # 1. each chunk's own state (zero initial state) and G at its ends
    first = [
        linear_fn(*a, **kw, position_offset=c.start, return_state=True, return_log_decay=True)
        for a, c in zip(pieces, mine, strict=True)
    ]
    state0 = first[0][1]
    st_shape = tuple(state0.shape)
    packed = torch.stack(
        [torch.cat([s.double().flatten(), g.double().flatten()]) for _, s, g in first]
    )  # [pieces, F]: one collective for the states and the log-decays (float64: G is absolute)
    # 2. every rank's chunks
    everyone = all_gather_grad(packed, 0, group) if comm else packed
    n_state = state0.numel()
    states = everyone[:, :n_state].view(-1, *st_shape).to(state0.dtype)
    logd = everyone[:, n_state:].view(-1, *st_shape[:2], 2)
    # the gathered rows in global chunk order
    length = mine[0].length
    row_of = {
        c.start // length: r * len(mine) + p for r in range(world) for p, c in enumerate(sharding.chunks(r))
    }
    order = [row_of[m] for m in range(len(row_of))]

    # 3. the scan: the state entering each of this rank's chunks, and G at its start - 1
    wanted = {c.start // length for c in mine}
    incoming: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    if causal:
        run, g_end = None, None
        for m, row in enumerate(order):
            if m in wanted:
                incoming[m] = (run, g_end)
            if m == len(order) - 1:
                break
            g_new = logd[row][..., 1]
            if run is None:
                run = states[row]
            else:
                step = torch.exp(g_new - g_end).to(run.dtype)[..., None, None]
                run = step * run + states[row]
            g_end = g_new
    else:
        for m in wanted:
            others = [states[row] for mm, row in enumerate(order) if mm != m]
            incoming[m] = (torch.stack(others).sum(0) if others else None, None)

    # 4. each chunk's output with its incoming state
    outs = []
    for a, c, (o0, _, _) in zip(pieces, mine, first, strict=True):
        s_in, g_in = incoming[c.start // length]
        if s_in is None:
            outs.append(o0)
            continue
        outs.append(linear_fn(*a, **kw, position_offset=c.start, initial_state=s_in, initial_log_decay=g_in))
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    if comm and everyone.requires_grad and torch.is_grad_enabled():
        o = _Tie.apply(o, everyone)
    return o


__all__ = ["linear_context_parallel"]
