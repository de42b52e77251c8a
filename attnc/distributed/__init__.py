"""Context parallelism: one attention call over a sequence sharded across the ranks of a torch.distributed
process group (NCCL on GPUs, gloo on CPUs).

    from attnc.distributed import context_parallel
    o = context_parallel(mod.causal, q, k, v, strategy="ring", layout="zigzag")

Each rank passes its shard of q, k, v and of the per-position auxiliary tensors (sharded like the sequence);
global auxiliary tensors (tables, slopes, sinks) and scalars are passed whole on every rank. i and j in the
spec are global positions. The result is this rank's shard of the output (and its log-sum-exp with
return_lse=True). See docs/distributed.md.
"""

from __future__ import annotations

from .launch import RankFailure, spawn_ranks
from .shards import Layout, Sharding, shard, sharding_for, unshard

__all__ = [
    "Layout",
    "RankFailure",
    "Sharding",
    "context_parallel",
    "shard",
    "sharding_for",
    "spawn_ranks",
    "unshard",
]


def context_parallel(op, *args, **kwargs):  # type: ignore[no-untyped-def]
    """See the module docstring and docs/distributed.md."""
    from .api import context_parallel as _cp

    return _cp(op, *args, **kwargs)
