"""Running a function on several processes of one machine: what the context-parallel tests and the example
use with gloo on CPUs (`torchrun --nproc-per-node R` does the same from the shell). No home-made transport:
torch.distributed's own rendezvous over a TCP store on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailure(RuntimeError):
    """A rank raised, or the group did not finish in time: the message names the ranks and their errors."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, backend: str, timeout_s: float, fn, args, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
        try:
            result = fn(rank, world, *args)
            dist.barrier()  # no rank tears its connections down while a peer still talks to it
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "result": result}, path)
    except BaseException as err:  # reported to the parent, which raises RankFailure
        torch.save({"ok": False, "error": f"{type(err).__name__}: {err}", "tb": traceback.format_exc()}, path)


def spawn_ranks(
    world: int,
    fn: Callable[..., Any],
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 120.0,
) -> list[Any]:
    """Run `fn(rank, world, *args)` on `world` fresh processes joined in one process group (gloo by default)
    and return each rank's result (picklable by torch.save), in rank order. `fn` must be importable by name
    (a module-level function). A rank that raises, and a group that does not finish within `timeout_s`
    (collectives time out then too, so no rank hangs), raise RankFailure naming every failed rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world, _free_port(), backend, timeout_s, fn, args, out_dir),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        import time

        deadline = time.monotonic() + timeout_s + 30.0
        finished = False
        try:
            while not finished:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                finished = ctx.join(timeout=min(1.0, left))
        except mp.ProcessRaisedException as err:  # a worker died outside fn (it reports fn's own errors)
            raise RankFailure(str(err)) from None
        except mp.ProcessExitedException as err:
            raise RankFailure(f"a rank exited abnormally: {err}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results, errors = [], []
        for rank in range(world):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {rank}: no result within {timeout_s:.0f} s")
                results.append(None)
                continue
            got = torch.load(path, weights_only=False)
            if got["ok"]:
                results.append(got["result"])
            else:
                errors.append(f"rank {rank}: {got['error']}")
                results.append(got)
        if errors:
            tbs = [
                f"rank {n}:\n{r['tb']}" for n, r in enumerate(results) if isinstance(r, dict) and "tb" in r
            ]
            detail = "\n".join(tbs)
            raise RankFailure("; ".join(errors) + ("\n" + detail if detail else ""))
        return results
