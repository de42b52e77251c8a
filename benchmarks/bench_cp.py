"""Context parallelism's step timings: forward and forward+backward of attnc.distributed.context_parallel per
strategy and layout, for causal and a sliding window, on every rank of a torchrun group.

    torchrun --nproc-per-node 8 benchmarks/bench_cp.py --json benchmarks/results/cp-DATE.json   # 8 GPUs (NCCL)
    torchrun --nproc-per-node 2 benchmarks/bench_cp.py --device cpu --tokens 512 --json /tmp/cp.json  # gloo

Run it with 1, 2, 4 and 8 processes for scaling (each run appends one record per case). On one GPU, several
processes share the device over NCCL's loopback: the per-step overlap of communication and compute is then
what the timings show. Every record names the device, torch and triton versions, the date, the world size
and what the schedule computed and sent (`ring_probe`). Timings are medians of CUDA-event (or wall-clock)
measurements after warm-up; the first call (compilation) is never timed.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnc  # noqa: E402
from attnc.distributed import context_parallel, shard, sharding_for  # noqa: E402
from attnc.distributed.api import ring_probe  # noqa: E402

CASES = (("causal", ()), ("sliding_window", (1024,)))


def _step(op, args, kw, backward: bool) -> None:  # type: ignore[no-untyped-def]
    """One context-parallel call: the forward only, or the forward and the backward of a unit dO."""
    with torch.set_grad_enabled(backward):
        o = context_parallel(op, *args, **kw)
        if backward:
            o.backward(torch.ones_like(o))


def _time(fn, reps: int, cuda: bool) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up (compiles)
    out = []
    for _ in range(reps):
        dist.barrier()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tokens", type=int, default=32768, help="the global sequence length N")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dtype = torch.bfloat16 if cuda else torch.float32
    backend = "triton"
    records = []
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (
        torch.randn(1, args.heads, args.tokens, args.head_dim, generator=g).to(dev, dtype) for _ in range(3)
    )
    for spec, scalars in CASES:
        op = getattr(attnc.compile(str(ROOT / "examples" / "specs" / f"{spec}.attn")), spec)
        for strategy in ("ring", "allgather"):
            for layout in ("contiguous", "zigzag"):
                sh = sharding_for(layout, world, args.tokens // world)
                ql, kl, vl = (shard(t, 2, sh, rank).requires_grad_() for t in (q, k, v))

                kw = {"strategy": strategy, "layout": layout, "backend": backend}
                fwd = functools.partial(_step, op, (ql, kl, vl, *scalars), kw, False)
                fwd_bwd = functools.partial(_step, op, (ql, kl, vl, *scalars), kw, True)
                with ring_probe() as probe:
                    fwd()
                rec = {
                    "spec": spec,
                    "scalars": list(scalars),
                    "strategy": strategy,
                    "layout": layout,
                    "world": world,
                    "rank": rank,
                    "tokens": args.tokens,
                    "heads": args.heads,
                    "head_dim": args.head_dim,
                    "dtype": str(dtype),
                    "fwd_ms": _time(fwd, args.reps, cuda),
                    "fwd_bwd_ms": _time(fwd_bwd, args.reps, cuda),
                    "schedule": dict(probe),
                }
                records.append(rec)
    gathered = [None] * world
    dist.all_gather_object(gathered, records)
    if rank == 0:
        meta = {
            "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
        }
        rows = [r for per in gathered for r in per]
        old = json.loads(args.json.read_text()) if args.json.exists() else {"runs": []}
        old["runs"].append({**meta, "records": rows})
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(old, indent=1))
        for r in rows:
            if r["rank"] == 0:
                print(f"{r['spec']:15s} {r['strategy']:9s} {r['layout']:10s} world {world}: "
                      f"fwd {r['fwd_ms']:.2f} ms, fwd+bwd {r['fwd_bwd_ms']:.2f} ms")  # fmt: skip
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
