"""`attnc inspect` tables of an OLD checkout (8f2620c, before issue 10's back end), compiled as a launch
compiles them, so that `aot_table.py` can compare them with today's `attnc inspect` (whose default is the
launch model, `codegen/triton/inspect.launch_specialised`).

8f2620c's own `attnc inspect` compiles every stride as an unknown int (no launch ran that way: torch hands the
kernels contiguous q, k, v, o, and Triton's launcher makes a stride equal to 1 a constant and marks 16-divisible
ints and 16-byte aligned pointers). This script applies the same specialisation to 8f2620c's compile jobs, and
optionally compiles them at other schedules (e.g. today's defaults, read from today's tables):

    git worktree add /tmp/wt8f 8f2620c            # and a venv with that checkout installed (pip -e)
    cd /tmp/wt8f && python /work/main/benchmarks/aot_launch_before.py OUT_DIR [SCHEDULES.json]

SCHEDULES: a folder of today's `attnc inspect` tables (SPEC_dD.txt, as the README's loop writes them), whose
kernels' schedules both sides then share, or a JSON file {"causal_d64": {"fwd": [BLOCK_M, BLOCK_N, warps,
stages], "bwd_dkdv": [...], ...}, ...}; a kernel it does not name keeps 8f2620c's default schedule. Writes
OUT_DIR/SPEC_dD.txt (fp16, D = 64 and 128, sm_90) for every examples/specs/*.attn. The linear core's kernels (`_lin_*`) are not compiled here.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any


def launch_form(job: Any, qkv_strides: list[str]) -> Any:
    """`job` as a launch with contiguous q, k, v, o compiles it: channel strides 1 (constants), the other
    q/k/v/o strides, the head dims and every pointer 16-divisible (D, E multiples of 16 here)."""
    unit = [n for n in qkv_strides if n.endswith("_d") and n in job.signature]
    types = {n: t for n, t in job.signature.items() if n not in unit}
    constexprs = {**job.constexprs, **dict.fromkeys(unit, 1)}
    divisible = [n for n, t in types.items() if t.startswith("*")]
    divisible += [n for n in qkv_strides if n in types] + [n for n in ("_D", "_E") if n in types]
    return dataclasses.replace(job, signature=types, constexprs=constexprs, divisible_by_16=divisible)


def schedules_from_tables(folder: Path) -> dict[str, dict[str, list[int]]]:
    """{table: {kind: [BLOCK_M, BLOCK_N, warps, stages]}} from a folder of `attnc inspect` tables."""
    from aot_table import read_schedules  # beside this file (its folder is sys.path[0] when run)

    return {path.stem: read_schedules(path) for path in sorted(folder.glob("*.txt"))}


def main(argv: list[str]) -> int:
    # 8f2620c's modules (run from that checkout, with its install).
    from attnc.codegen.module import compile_source
    from attnc.codegen.reference_runtime import _KernelConfig, _triton_kernels
    from attnc.codegen.triton import inspect as ins
    from attnc.codegen.triton.aot import AOTCompileError, compile_reports, format_table
    from attnc.codegen.triton.kernels import _QKV_STRIDES

    from attnc import cli

    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    where = Path(argv[1]) if len(argv) > 1 else None
    if where is None:
        schedules: dict[str, Any] = {}
    elif where.is_dir():
        schedules = schedules_from_tables(where)
    else:
        schedules = json.loads(where.read_text())
    default = ins._schedule
    failed = 0
    for spec in sorted(Path("examples/specs").glob("*.attn")):
        for d in (64, 128):
            table = f"{spec.stem}_d{d}"
            over = schedules.get(table, {})

            def schedule(kind: str, D: int, E: int, heavy: bool, over: dict = over) -> Any:
                return _KernelConfig(*over[kind]) if kind in over else default(kind, D, E, heavy)

            ins._schedule = schedule  # 8f2620c's jobs() has no schedule parameter
            kernels = _triton_kernels(compile_source(spec.read_text(), str(spec)).__file__, interpret=False)
            jobs = ins.all_jobs(cli._select(str(spec), None), kernels, [ins.Target(90, "fp16", d)])
            reports = compile_reports(
                [launch_form(j, _QKV_STRIDES) for j in jobs], max_workers=2, raise_on_error=False
            )
            for r in reports:
                if isinstance(r, AOTCompileError):
                    failed += 1
                    print(f"{table}: {r}", file=sys.stderr)
            ok = [r for r in reports if not isinstance(r, AOTCompileError)]
            (out / f"{table}.txt").write_text(format_table(ok) + "\n")
            print(table, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":  # compile_reports' worker processes import this file again
    sys.exit(main(sys.argv[1:]))
