"""Static loop cost of every example spec's kernels: registers, spills, wgmma, TMA and SASS instructions per
key-loop iteration, from the ahead-of-time compile for sm_90 (no GPU: `attnc inspect`'s figures, as JSON).

    nice python benchmarks/aot_loop_cost.py                       # every examples/specs/*.attn; a few minutes
    python benchmarks/aot_loop_cost.py examples/specs/causal.attn --json /tmp/causal.json
    python benchmarks/aot_loop_cost.py --against benchmarks/results/aot_loop_cost.json   # print what changed

Each spec is compiled as `attnc inspect SPEC --cc 90` does (the same jobs: attnc.cli.inspect_jobs, at the
runtime's default schedules) at two targets: fp16 with D = 64 and bf16 with D = 128. The SASS count is that of
`attnc inspect`'s `sass/iter` column (codegen/triton/sass.py): the instructions of the largest innermost loop
holding an MMA, every path of its body counted once (`sass_loops` lists each such loop: a kernel whose loop is
split into boundary and interior tiles has two), or the whole kernel's count when it has no such loop
(`sass_scope` "kernel"). These are static counts of the binary, comparable from one commit to the next;
they are no timing. The JSON is written to benchmarks/results/aot_loop_cost.json by default.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # this checkout's attnc, not whichever one is installed
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
SPECS = ROOT / "examples" / "specs"
# (label, cc, dtype, head dim): what the issue asks CI to compile for sm_90 (codegen/triton/inspect.py).
TARGETS = (("sm90_fp16_d64", 90, "fp16", 64), ("sm90_bf16_d128", 90, "bf16", 128))


def _versions() -> dict[str, Any]:
    import importlib.metadata as md

    out: dict[str, Any] = {"python": platform.python_version()}
    for pkg in ("torch", "triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["git_commit"] = None
    from attnc.codegen.triton import sass

    try:
        tool, path = sass.find_disassembler()
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
        release = next((ln.strip() for ln in proc.stdout.splitlines() if "release" in ln), "")
        out["disassembler"] = f"{tool} ({release})" if release else tool
    except sass.DisassemblerNotFoundError:
        out["disassembler"] = None
    return out


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "gpu": False,  # made on CPU: ahead-of-time compiles only
    }


def _row(spec: str, label: str, r: Any) -> dict[str, Any]:
    from attnc.codegen.triton.aot import AOTCompileError

    if isinstance(r, AOTCompileError):
        return {"spec": spec, "target": label, "kernel": r.kernel, "error": r.compiler_message[:2000]}
    return {
        "spec": spec,
        "target": label,
        "kernel": r.name,
        "num_warps": r.num_warps,
        "num_stages": r.num_stages,
        "shared_bytes": r.shared_bytes,
        "registers": r.registers,
        "spill_bytes": r.spill_bytes,
        "wgmma": r.uses_wgmma,
        "tma": r.uses_tma,
        "sass_instructions": r.sass_instructions,
        "sass_scope": r.sass_scope or None,
        "sass_loops": list(r.sass_loops),
        "sass_total": r.sass_total,
        "config": r.config,
    }


def measure(specs: list[Path], jobs: int) -> list[dict[str, Any]]:
    from attnc.codegen.triton.aot import compile_reports

    from attnc.cli import inspect_jobs

    rows: list[dict[str, Any]] = []
    for path in specs:
        spec = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
        for label, cc, dtype, d in TARGETS:
            reports = compile_reports(
                inspect_jobs(str(path), None, cc, dtype, d), max_workers=jobs, raise_on_error=False
            )
            rows += [_row(spec, label, r) for r in reports]
            print(f"  {spec} {label}: {len(reports)} kernels", file=sys.stderr, flush=True)
    return rows


def _sass_cell(r: dict[str, Any]) -> str:
    if r.get("error"):
        return "error"
    if r["sass_scope"] == "loop":
        return ",".join(str(n) for n in r["sass_loops"])
    if r["sass_scope"] == "kernel":
        return f"{r['sass_total']} (kernel)"
    return "-"


def table(
    rows: list[dict[str, Any]], before: dict[tuple[str, str, str], dict[str, Any]] | None = None
) -> str:
    """One line per kernel; with `before` (an earlier JSON's rows), old -> new where a figure changed."""
    head = ("spec", "target", "kernel", "regs", "spill B", "wgmma", "tma", "sass/iter")
    lines = []
    for r in rows:
        spec = Path(r["spec"]).stem
        if r.get("error"):
            lines.append((spec, r["target"], r["kernel"], "error", "", "", "", ""))
            continue
        cells = [str(r["registers"]), str(r["spill_bytes"]), "yes" if r["wgmma"] else "no"]
        cells += ["yes" if r["tma"] else "no", _sass_cell(r)]
        old = (before or {}).get((r["spec"], r["target"], r["kernel"]))
        if old is not None and not old.get("error"):
            was = [str(old["registers"]), str(old["spill_bytes"]), "yes" if old["wgmma"] else "no"]
            was += ["yes" if old["tma"] else "no", _sass_cell(old)]
            cells = [c if c == w else f"{w} -> {c}" for c, w in zip(cells, was, strict=True)]
        lines.append((spec, r["target"], r["kernel"], *cells))
    widths = [max(len(x[c]) for x in [head, *lines]) for c in range(len(head))]
    fmt = [(w, c in (3, 4, 7)) for c, w in enumerate(widths)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            x.rjust(w) if num else x.ljust(w) for x, (w, num) in zip(cells, fmt, strict=True)
        ).rstrip()

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(x) for x in lines)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="*", type=Path, help="spec files (default: every examples/specs/*.attn)")
    ap.add_argument(
        "--json", type=Path, default=RESULTS / "aot_loop_cost.json", help="where to write the JSON"
    )
    ap.add_argument("--against", type=Path, help="an earlier JSON of this script: print old -> new figures")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="parallel compile processes")
    args = ap.parse_args(argv)
    specs = [p.resolve() for p in args.specs] or sorted(SPECS.glob("*.attn"))
    before = None
    if args.against:  # read first: --against may name the file this run overwrites
        old = json.loads(args.against.read_text())
        before = {(r["spec"], r["target"], r["kernel"]): r for r in old["rows"]}
    started = dt.datetime.now(dt.timezone.utc)
    rows = measure(specs, args.jobs)
    doc = {
        "benchmark": "aot_loop_cost",
        "date": started.isoformat(timespec="seconds"),
        "made_on": "CPU: ahead-of-time compiles for sm_90 with the triton wheel's ptxas, SASS counted from the "
        "cubin with its nvdisasm; no GPU, no timing",
        "machine": _machine(),
        "versions": _versions(),
        "targets": [{"label": t[0], "cc": t[1], "dtype": t[2], "head_dim": t[3]} for t in TARGETS],
        # codegen/triton/inspect.launch_specialised: what a launch with the runtime's contiguous q, k, v, o
        # compiles (unit channel strides constant, 16-divisible strides), as `attnc inspect` without
        # --any-strides (files made before it compiled for arbitrary strides, and say nothing here)
        "compile": "launch model",
        "sass_note": "sass_instructions: the largest innermost loop holding an MMA (sass_loops: each such loop, "
        "in address order; every path of the body counted once), or the whole kernel (sass_scope 'kernel')",
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(rows, before))
    errors = [r for r in rows if r.get("error")]
    print(f"\n{len(rows)} kernels, {len(errors)} failed to compile; written to {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
