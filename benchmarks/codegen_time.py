"""Compile time of every example and zoo spec: cold (a fresh process, an empty module cache) and warm (the
module cache filled), with the time per phase (parse, check, lower, plan, emit, import).

    python benchmarks/codegen_time.py                  # every spec, once; table + JSON in benchmarks/results/
    python benchmarks/codegen_time.py --repeat 3       # the minimum of three runs (a loaded machine)
    python benchmarks/codegen_time.py zoo/specs/neighborhood_2d.attn

Each measurement runs in its own Python process, so nothing (sympy's cache, the tile-plan memo, imported
generated modules) carries over between specs. The process first imports torch and attnc: that start-up is
the same for every spec and is reported apart ("startup"), not in the compile time. "cold" is
`attnc.codegen.module.compile_source` with no module cached (the directory holds only the parser's tables,
built once per installation; their build time is reported apart): spec text to an imported module (wall
time, and the process's CPU time, which a machine loaded by other jobs inflates less).
"warm" is the same call in a new process once the cache holds the module (read, verify, import). The phase
breakdown comes from `attnc check --timings` (attnc/cli.py `phase_timings`), run after the cold compile with
sympy's cache and the tile-plan memo cleared.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch  # noqa: F401  (start-up, the same for every spec)
from attnc.codegen.module import compile_source
import sympy
from attnc.dsl.analysis import tiles
try:
    from attnc.cli import phase_timings
except ImportError:  # a tree from before `attnc check --timings` (the "before" column)
    phase_timings = None
startup = time.perf_counter() - t0
path, mode = sys.argv[1], sys.argv[2]
source = open(path, encoding="utf-8").read()
t, c = time.perf_counter(), time.process_time()
compile_source(source, path)
total, cpu = time.perf_counter() - t, time.process_time() - c
out = {"startup": startup, "total": total, "cpu": cpu}
if mode == "cold" and phase_timings is not None:
    sympy.core.cache.clear_cache()
    tiles.clear_plan_cache()
    out["phases"] = phase_timings(source, path)
print(json.dumps(out))
"""


def _run(path: Path, mode: str, cache: Path, root: Path) -> dict:
    env = {**os.environ, "ATTNC_CACHE_DIR": str(cache), "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), mode],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{path}: {mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _seed_parser_cache(cache: Path, root: Path) -> None:
    """Fill a fresh cache directory with the parser's tables only (dsl/parser.py caches them there once per
    installation and grammar): "cold" means no generated module cached, as a user's first compile of a new
    spec meets it. The one-off table build is reported apart, as `parser_tables_s`."""
    env = {**os.environ, "ATTNC_CACHE_DIR": str(cache)}
    code = "from attnc.dsl import parser; parser._lark()"
    # check=False: an older tree (--root) has no such cache, and then there is nothing to seed
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, timeout=600)


def _parser_tables_time(root: Path) -> float | None:
    """Seconds to build the parser's tables with no cache (once per installation and grammar)."""
    code = (
        "import time; from attnc.dsl import parser; t = time.perf_counter(); parser._lark(); "
        "print(time.perf_counter() - t)"
    )
    with tempfile.TemporaryDirectory(prefix="attnc-bench-") as tmp:
        env = {**os.environ, "ATTNC_CACHE_DIR": tmp}
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600
        )
    return float(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None


def measure(path: Path, repeat: int, root: Path = ROOT) -> dict:
    """min over `repeat` runs of the cold and warm times (a fresh cache directory per cold run)."""
    best: dict | None = None
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="attnc-bench-") as tmp:
            _seed_parser_cache(Path(tmp), root)
            cold = _run(path, "cold", Path(tmp), root)
            warm = _run(path, "warm", Path(tmp), root)
        row = {
            "cold_s": cold["total"],
            "cold_cpu_s": cold["cpu"],
            "warm_s": warm["total"],
            "startup_s": cold["startup"],
            "phases_s": cold.get("phases"),
        }
        if best is None or row["cold_s"] < best["cold_s"]:
            best = row | {"warm_s": min(row["warm_s"], best["warm_s"]) if best else row["warm_s"]}
        elif row["warm_s"] < best["warm_s"]:
            best["warm_s"] = row["warm_s"]
    assert best is not None
    return best


def _versions(root: Path) -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "sympy", "triton", "lark"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    version = (root / "codegen" / "version.py").read_text(encoding="utf-8")
    out["attnc"] = next(
        (
            ln.split("=")[1].strip().strip("\"'")
            for ln in version.splitlines()
            if ln.startswith("ATTNC_VERSION")
        ),
        None,
    )
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["git_commit"] = None
    return out


def _machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_start": load,
        "gpu": False,  # compile time only: everything here runs on the CPU
    }


def table(rows: dict[str, dict]) -> str:
    phases = ("parse", "check", "lower", "plan", "emit", "import")
    head = f"{'spec':44s} {'cold s':>7s} {'cpu s':>7s} {'warm s':>7s} " + " ".join(f"{p:>7s}" for p in phases)
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        ph = " ".join(f"{r['phases_s'][p]:7.3f}" for p in phases) if r["phases_s"] else ""
        lines.append(f"{name:44s} {r['cold_s']:7.3f} {r['cold_cpu_s']:7.3f} {r['warm_s']:7.3f} {ph}")
    worst = max(rows.items(), key=lambda kv: kv[1]["cold_s"])
    lines.append(f"slowest cold: {worst[0]} {worst[1]['cold_s']:.3f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("specs", nargs="*", help="spec files (default: every examples/ and zoo/ spec)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per spec; the minimum is kept")
    ap.add_argument("--output", help="JSON file (default: benchmarks/results/codegen_time-<date>.json)")
    ap.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        help="the attnc source tree to time (e.g. a checkout of an older commit)",
    )
    args = ap.parse_args(argv)
    root = args.root.resolve()
    dirs = (root / "examples" / "specs", root / "zoo" / "specs")
    specs = [Path(s).resolve() for s in args.specs] or sorted(p for d in dirs for p in d.glob("*.attn"))
    started = dt.datetime.now(dt.timezone.utc)
    machine = _machine()
    rows: dict[str, dict] = {}
    for path in specs:
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        rows[name] = measure(path, args.repeat, root)
        r = rows[name]
        print(f"{name}: cold {r['cold_s']:.3f} s, warm {r['warm_s']:.3f} s", file=sys.stderr, flush=True)
    report = {
        "benchmark": "codegen_time",
        "date": started.isoformat(timespec="seconds"),
        "machine": machine,
        "versions": _versions(root),
        "repeat": args.repeat,
        "note": "CPU-made; times in seconds; cold/warm exclude the per-process start-up (torch + attnc import)"
        " and the parser's one-off table build (parser_tables_s), done once per installation",
        "parser_tables_s": _parser_tables_time(root),
        "specs": rows,
    }
    out = Path(args.output) if args.output else RESULTS / f"codegen_time-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table(rows))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
