"""The large-tile schedules of issue 17, compiled ahead of time for sm_90 (no GPU): registers, spill bytes, TMA
and SASS instructions per key-loop iteration of each kernel, as JSON, so one commit can be compared with the
next.

    python benchmarks/aot_large_tiles.py --json benchmarks/results/aot_large_tiles.json
    python benchmarks/aot_large_tiles.py --against benchmarks/results/aot_large_tiles.json   # old -> new

The matrix (FlashAttention-3 and the Triton tutorial's tile sizes): the causal forward at D = 128 (fp16 and
bf16) at 128 x 64 (8 warps, 3 stages) and 128 x 128 (8 warps, 2 stages), at D = 64 (fp16) at 128 x 128 with
4 and 8 warps; the ALiBi, sliding-window, softcap, sink and document-mask forwards at 128 x 64; the causal
dK/dV and dQ kernels at D = 128 at 64 x 128 and 128 x 64 (8 warps, 2 stages; dK/dV at 64 x 128 also at one
stage, and in bf16). Each compile is what a launch
with contiguous inputs compiles (`attnc inspect SPEC --config ...`). Static figures; no timing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # this checkout's attnc, not whichever one is installed
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from aot_loop_cost import _machine, _row, _versions  # noqa: E402

# (spec, dtype, head dim, kernel kind as --config names it, schedule)
MATRIX: list[tuple[str, str, int, str, str]] = [
    *(("causal", dt_, 128, "fwd", cfg) for dt_ in ("fp16", "bf16") for cfg in ("128,64,8,3", "128,128,8,2")),
    ("causal", "fp16", 64, "fwd", "128,128,4,3"),
    ("causal", "fp16", 64, "fwd", "128,128,8,3"),
    *(
        (s, "fp16", 128, "fwd", "128,64,8,3")
        for s in ("alibi", "sliding_window", "softcap", "sink", "document")
    ),
    *(("causal", "fp16", 128, k, cfg) for k in ("dkdv", "dq") for cfg in ("64,128,8,2", "128,64,8,2")),
    # dK/dV at 64 x 128 runs keys as rows (`kernels.KEY_ROWS`); it fits at one stage (two: 160 spill bytes).
    ("causal", "fp16", 128, "dkdv", "64,128,8,1"),
    ("causal", "bf16", 128, "dkdv", "64,128,8,1"),
    ("causal", "bf16", 128, "dkdv", "128,64,8,2"),
]
_KIND = {"fwd": "fwd", "dkdv": "bwd_dkdv", "dq": "bwd_dq"}


def measure(jobs: int) -> list[dict[str, Any]]:
    from attnc.codegen.triton.aot import compile_reports
    from attnc.codegen.triton.inspect import parse_configs

    from attnc.cli import inspect_jobs

    rows: list[dict[str, Any]] = []
    for spec, dtype, d, kind, cfg in MATRIX:
        bm, bn, warps, stages = cfg.split(",")
        text = f"{kind}:BLOCK_M={bm},BLOCK_N={bn},warps={warps},stages={stages}"
        path = ROOT / "examples" / "specs" / f"{spec}.attn"
        todo = [
            j
            for j in inspect_jobs(str(path), None, 90, dtype, d, configs=parse_configs([text], d))
            if j.fn.__name__.endswith(f"_{_KIND[kind]}_kernel")
        ]
        for r in compile_reports(todo, max_workers=jobs, raise_on_error=False):
            row = _row(f"examples/specs/{spec}.attn", f"sm90_{dtype}_d{d}", r)
            rows.append({**row, "schedule": f"{bm}x{bn}, {warps} warps, {stages} stages"})
        print(f"  {spec} {dtype} D={d} {kind} {cfg}", file=sys.stderr, flush=True)
    return rows


def _key(r: dict[str, Any]) -> tuple[str, str, str, str]:
    return (r["spec"], r["target"], r["kernel"], r["schedule"])


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    if r.get("error"):
        return "error"
    loops = ",".join(str(n) for n in r["sass_loops"]) or f"{r['sass_total']} (kernel)"
    return f"{r['registers']}/{r['spill_bytes']} tma={'yes' if r['tma'] else 'no'} sass={loops}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--against", type=Path, help="an earlier JSON of this script: print old -> new")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="parallel compile processes")
    args = ap.parse_args(argv)
    rows = measure(args.jobs)
    before = {}
    if args.against is not None:
        before = {_key(r): r for r in json.loads(args.against.read_text())["rows"]}
    for r in rows:
        old = before.get(_key(r))
        was = f"{_cell(old)} -> " if args.against is not None else ""
        print(
            f"{Path(r['spec']).stem:15s} {r['target']:15s} {r['kernel']:32s} {r['schedule']:28s} {was}{_cell(r)}"
        )
    if args.json is not None:
        doc = {
            "benchmark": "aot_large_tiles",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "made_on": "CPU: ahead-of-time compiles for sm_90 with the triton wheel's ptxas; no GPU, no timing",
            "machine": _machine(),
            "versions": _versions(),
            "rows": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
