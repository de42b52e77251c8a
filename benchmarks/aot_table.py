"""Compare two sets of `attnc inspect` tables (sm_90 registers and spill bytes per kernel), before and after a
change, and write the comparison as JSON (static data, made on a CPU by the ahead-of-time compile).

    for s in examples/specs/*.attn; do for d in 64 128; do
        python -m attnc inspect $s --head-dim $d > DIR/$(basename $s .attn)_d$d.txt; done; done
    python benchmarks/aot_table.py BEFORE_DIR AFTER_DIR --json benchmarks/results/aot_sm90.json
        [--earlier benchmarks/results/aot_sm90.json]   # before-tables not re-measured: from that comparison

Prints a Markdown table and exits 1 when any kernel got more registers or spills than before.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_table(path: Path) -> dict[str, tuple[int, int]]:
    """{kernel: (registers, spill bytes)} of the sm_90 rows of an `attnc inspect` table."""
    rows: dict[str, tuple[int, int]] = {}
    lines = path.read_text().splitlines()
    for line in lines[2:]:
        cells = line.split()
        if len(cells) >= 7 and cells[1] == "sm_90":
            rows[cells[0]] = (int(cells[5]), int(cells[6]))
    return rows


# The attention kernels' kinds by the end of their names (`_<attention>_<kind>_kernel`).
KINDS = {
    "_fwd_kernel": "fwd",
    "_bwd_dkdv_kernel": "bwd_dkdv",
    "_bwd_dq_kernel": "bwd_dq",
    "_fwd_split_kernel": "fwd_split",
    "_fwd_combine_kernel": "fwd_combine",
}


def read_schedules(path: Path) -> dict[str, list[int]]:
    """{kind: [BLOCK_M, BLOCK_N, warps, stages]} of the attention kernels' sm_90 rows of an `attnc inspect`
    table. The linear core's `_lin_*` rows are skipped: their names end like the attention kernels' and their
    tiles are named otherwise."""
    out: dict[str, list[int]] = {}
    for line in path.read_text().splitlines()[2:]:
        cells = line.split()
        if len(cells) < 7 or cells[1] != "sm_90" or cells[0].startswith("_lin_"):
            continue
        kind = next((k for end, k in KINDS.items() if cells[0].endswith(end)), None)
        tiles = dict(c.split("=", 1) for c in cells if c.startswith(("_BLOCK_M=", "_BLOCK_N=")))
        if kind and len(tiles) == 2:
            out[kind] = [int(tiles["_BLOCK_M"]), int(tiles["_BLOCK_N"]), int(cells[2]), int(cells[3])]
    return out


def earlier_before(path: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """{table: {kernel: (registers, spill bytes)}} of the "before" side of an earlier comparison JSON."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for r in json.loads(path.read_text())["rows"]:
        out.setdefault(r["table"], {})[r["kernel"]] = (r["regs_before"], r["spill_before"])
    return out


def compare(
    before: Path, after: Path, fallback: dict[str, dict[str, tuple[int, int]]] | None = None
) -> list[dict[str, object]]:
    """One row per kernel of each "before" table. A table missing from `before` (or empty: a run that did not
    finish) takes its "before" side from `fallback` (an earlier comparison of the same commit), and its rows
    say so in `before_from`; a measured table that disagrees with the fallback is an error."""
    out: list[dict[str, object]] = []
    measured = {b.stem: read_table(b) for b in sorted(before.glob("*.txt"))}
    measured = {t: rows for t, rows in measured.items() if rows}
    for table, rows in (fallback or {}).items():
        if table in measured and measured[table] != rows:
            raise SystemExit(f"{table}: the measured 'before' table differs from the earlier comparison's")
    tables = sorted({*measured, *(fallback or {})})
    for table in tables:
        old = measured.get(table) or (fallback or {})[table]
        a = after / f"{table}.txt"
        new = read_table(a) if a.exists() else {}
        for kernel, (regs, spill) in old.items():
            got = new.get(kernel)
            out.append(
                {
                    "table": table,
                    "kernel": kernel,
                    "regs_before": regs,
                    "regs_after": None if got is None else got[0],
                    "spill_before": spill,
                    "spill_after": None if got is None else got[1],
                    "before_from": "measured" if table in measured else "earlier comparison",
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--json", type=Path, help="write the comparison here")
    ap.add_argument("--note", default="", help="what the two sides are (stored in the JSON)")
    ap.add_argument(
        "--earlier",
        type=Path,
        help="an earlier comparison JSON of the same 'before' commit: its before side stands in for tables "
        "missing from BEFORE (each measured table must agree with it)",
    )
    args = ap.parse_args(argv)
    rows = compare(args.before, args.after, earlier_before(args.earlier) if args.earlier else None)
    worse = [
        r
        for r in rows
        if r["regs_after"] is None
        or r["regs_after"] > r["regs_before"]  # type: ignore[operator]
        or r["spill_after"] > r["spill_before"]  # type: ignore[operator]
    ]
    print("| table | kernel | regs before | regs after | spill B before | spill B after |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['table']} | {r['kernel']} | {r['regs_before']} | {r['regs_after']} | "
            f"{r['spill_before']} | {r['spill_after']} |"
        )
    print(
        f"\n{len(rows)} kernels, {len(worse)} worse, {sum(r['regs_after'] != r['regs_before'] for r in rows)} changed"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": "attnc-aot-comparison",
            "made_on": "CPU (ahead-of-time compile for sm_90 with the triton wheel's ptxas; no GPU)",
            "note": args.note,
            "rows": rows,
        }
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
