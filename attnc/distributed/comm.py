"""Differentiable collectives over a torch.distributed process group, the few the context-parallel operators
need (torch.distributed.nn's all_gather backs onto reduce_scatter, which gloo does not have)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_of(group) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """(rank, world size) in `group` (None: the default group, which must be initialised)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "context parallelism needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, or torchrun)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather_cat(t: torch.Tensor, dim: int, group) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Every rank's `t` (same shape on every rank) concatenated along `dim`, in rank order; no autograd."""
    _, world = world_of(group)
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _AllGather(torch.autograd.Function):
    """Forward: all-gather along `dim`. Backward: the gradient of the whole summed over ranks (each rank's
    loss reads the gathered tensor), and this rank's slice of it."""

    @staticmethod
    def forward(ctx, t, dim, group):  # type: ignore[no-untyped-def]
        ctx.dim, ctx.group = dim, group
        ctx.rank, ctx.world = world_of(group)
        ctx.size = t.shape[dim]
        return all_gather_cat(t, dim, group)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        g = g.contiguous()
        if ctx.world > 1:
            dist.all_reduce(g, group=ctx.group)
        return g.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size), None, None


def all_gather_grad(t: torch.Tensor, dim: int, group) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """`all_gather_cat` with a backward (the summed gradient's own slice)."""
    return _AllGather.apply(t, dim, group)


class _SumGrads(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient: a replicated input every rank reads gets the
    gradient of the sum of every rank's loss, as in the single-process call."""

    @staticmethod
    def forward(ctx, t, group):  # type: ignore[no-untyped-def]
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        g = g.contiguous().clone()
        if world_of(ctx.group)[1] > 1:
            dist.all_reduce(g, group=ctx.group)
        return g, None


def replicated(t: torch.Tensor, group) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """A replicated input whose gradient sums over ranks (identity where nothing needs a gradient)."""
    if not (t.requires_grad and torch.is_grad_enabled()):
        return t
    return _SumGrads.apply(t, group)


def agree(values: list[int], group, what: str, problem: BaseException | None = None) -> None:  # type: ignore[no-untyped-def]
    """Every rank passes the same `values` and found nothing wrong locally (`problem`), or every rank raises:
    a rank with a problem its own error, the others a ValueError naming that rank, or, where the values
    differ, the same ValueError naming them. Two small collectives that every rank reaches, whatever its
    arguments: no rank is left waiting in a later one."""
    _, world = world_of(group)
    if world == 1:
        if problem is not None:
            raise problem
        return
    head = torch.tensor([[int(problem is not None), len(values)]], dtype=torch.int64)
    heads = all_gather_cat(head, 0, group)
    width = int(heads[:, 1].max()) + 1
    mine = torch.full((1, width), -1, dtype=torch.int64)
    mine[0, 0] = len(values)
    if values:
        mine[0, 1 : len(values) + 1] = torch.tensor(values, dtype=torch.int64)
    got = all_gather_cat(mine, 0, group)
    if problem is not None:
        raise problem
    bad = [r for r in range(world) if int(heads[r, 0])]
    if bad:
        ranks = ", ".join(str(r) for r in bad)
        raise ValueError(f"context_parallel: rank {ranks} refused its arguments (its own error says why)")
    if bool((got != got[0]).any()):
        table = ", ".join(f"rank {r}: {got[r, 1 : int(got[r, 0]) + 1].tolist()}" for r in range(world))
        raise ValueError(f"context_parallel: {what} differ across ranks ({table})")
