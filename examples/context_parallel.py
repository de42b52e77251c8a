"""Context parallelism on one machine's CPUs: a causal attention over a sequence sharded across 4 processes.

    torchrun --nproc-per-node 4 examples/context_parallel.py            # gloo on CPUs
    torchrun --nproc-per-node 4 examples/context_parallel.py --layout zigzag --strategy allgather

Each rank builds the same full-sequence tensors (seeded), keeps its shard, runs the ring, and rank 0 checks
the gathered output and gradients against the single-process operator. On GPUs use the NCCL backend and move
the tensors to each rank's device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnc  # noqa: E402
from attnc.distributed import context_parallel, shard, sharding_for, unshard  # noqa: E402
from attnc.distributed.api import ring_probe  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "examples" / "specs" / "causal.attn"))
    ap.add_argument("--layout", default="zigzag", choices=("contiguous", "zigzag"))
    ap.add_argument("--strategy", default="ring", choices=("ring", "allgather"))
    ap.add_argument("--backend", default="triton", choices=("reference", "triton"))
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    mod = attnc.compile(args.spec)
    op = mod.causal
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, args.tokens, 32, generator=g) for _ in range(3))
    sh = sharding_for(args.layout, world, args.tokens // world)
    ql, kl, vl = (shard(t, 2, sh, rank).requires_grad_() for t in (q, k, v))
    with ring_probe() as probe:
        o = context_parallel(op, ql, kl, vl, strategy=args.strategy, layout=args.layout, backend=args.backend)
        o.square().sum().backward()
    parts = {name: [torch.empty_like(t) for _ in range(world)] for name, t in (("o", o), ("dq", ql.grad))}
    dist.all_gather(parts["o"], o.detach().contiguous())
    dist.all_gather(parts["dq"], ql.grad.contiguous())
    print(f"rank {rank}: {probe}", flush=True)
    ok = True
    if rank == 0:
        qf = q.clone().requires_grad_()
        want = op(qf, k, v, backend=args.backend)
        want.square().sum().backward()
        err_o = float((unshard(parts["o"], 2, sh) - want.detach()).abs().max())
        err_dq = float((unshard(parts["dq"], 2, sh) - qf.grad).abs().max())
        ok = err_o < 1e-4 and err_dq < 1e-3
        print(
            f"{args.strategy}/{args.layout} on {world} ranks: max |o - o_ref| = {err_o:.2e}, "
            f"max |dq - dq_ref| = {err_dq:.2e}: {'OK' if ok else 'MISMATCH'}"
        )
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
