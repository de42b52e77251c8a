"""Which sampler reaches the best configs in few trials: exhaustive ground truth once, then replays.

The issue's benchmark, in two steps so that GPU time is spent once:

1. `ground_truth`: measure every config of the pruned space once (on a GPU, with `KernelObjective`; compile
   ahead of time on the CPU first with `attnc tune --prescreen` so that only viable configs are timed) and
   save `{config: ms or null}` as JSON;
2. `replay`: run each sampler many times against that table (an objective that looks times up instead of
   launching anything, so seeds are free) and report the best-so-far as a fraction of the true best after
   5, 10, 25 and 50 measured trials, averaged over seeds.

    python -m autotune.benchmark replay truth.json --samplers gp tpe random grid --seeds 10 --out samplers.json

`tests/test_autotune_benchmark.py` runs the replay on a synthetic truth; GPU ground truth is still to come.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .key import DeviceInfo, TuningKey
from .measure import FailReason, Measurement, Objective, TrialFailure
from .resource import GpuArch, prune
from .search import SamplerKind, tune
from .space import Candidate, KernelSpace

__all__ = ["BUDGETS", "SamplerReport", "TableObjective", "ground_truth", "load_truth", "replay", "save_truth"]

BUDGETS = (5, 10, 25, 50)


def ground_truth(
    space: KernelSpace, objective: Objective, arch: GpuArch | None = None
) -> dict[Candidate, float | None]:
    """Every config of the (pruned) space measured once: ms, or None where the measurement failed."""
    cands = prune(space, arch)[0] if arch is not None else space.candidates()
    out: dict[Candidate, float | None] = {}
    for c in cands:
        try:
            out[c] = objective.measure(c).time_ms
        except TrialFailure:
            out[c] = None
    return out


def save_truth(truth: Mapping[Candidate, float | None], path: Path, meta: Mapping[str, Any]) -> None:
    rows = [{"config": c.as_dict(), "time_ms": t} for c, t in sorted(truth.items())]
    path.write_text(
        json.dumps({"meta": dict(meta), "kind": next(iter(truth)).kind.value, "rows": rows}, indent=1)
    )


def load_truth(path: Path) -> tuple[dict[Candidate, float | None], dict[str, Any]]:
    from .space import KernelKind

    data = json.loads(path.read_text())
    kind = KernelKind(data["kind"])
    return {Candidate.of(kind, r["config"]): r["time_ms"] for r in data["rows"]}, data.get("meta", {})


@dataclass
class TableObjective:
    """Looks a config's time up in the ground truth: what the samplers are compared on."""

    truth: Mapping[Candidate, float | None]

    def measure(self, c: Candidate) -> Measurement:
        t = self.truth.get(c)
        if t is None:
            raise TrialFailure(
                FailReason.INFEASIBLE if c not in self.truth else FailReason.LAUNCH, "in the truth"
            )
        return Measurement(t, (t,))


@dataclass(frozen=True)
class SamplerReport:
    sampler: str
    fraction_of_best: dict[int, float]  # budget -> mean over seeds of (true best / best so far) in (0, 1]
    found_best: dict[int, float]  # budget -> share of seeds that hit the true best


def replay(
    space: KernelSpace,
    truth: Mapping[Candidate, float | None],
    samplers: Sequence[SamplerKind] = tuple(SamplerKind),
    seeds: int = 5,
    budgets: Sequence[int] = BUDGETS,
) -> list[SamplerReport]:
    """Each sampler, `seeds` times, against the truth (in-memory storage: nothing touches the disk)."""
    import optuna

    best = min(t for t in truth.values() if t is not None)
    space_in_truth = _restricted(space, truth)
    reports = []
    for kind in samplers:
        fractions: dict[int, list[float]] = {b: [] for b in budgets}
        for seed in range(seeds):
            key = TuningKey.make(f"replay-{kind.value}-{seed}", space.kind, "-", _DEVICE, space.problem)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = tune(
                    key,
                    space_in_truth,
                    TableObjective(truth),
                    storage=optuna.storages.InMemoryStorage(),
                    n_trials=max(budgets),
                    sampler=kind,
                    seed=seed,
                )
            measured = sorted(
                (r for r in res.records if r.state in ("COMPLETE", "FAIL")), key=lambda r: r.number
            )
            so_far, curve = float("inf"), []
            for r in measured:
                if r.time_ms is not None:
                    so_far = min(so_far, r.time_ms)
                curve.append(so_far)
            for b in budgets:
                reached = curve[min(b, len(curve)) - 1] if curve else float("inf")
                fractions[b].append(best / reached if reached < float("inf") else 0.0)
        reports.append(
            SamplerReport(
                kind.value,
                {b: statistics.fmean(v) for b, v in fractions.items()},
                {b: sum(1 for f in v if f >= 1.0 - 1e-12) / len(v) for b, v in fractions.items()},
            )
        )
    return reports


_DEVICE = DeviceInfo("replay", 0, "-", "-")


def _restricted(space: KernelSpace, truth: Mapping[Candidate, float | None]) -> KernelSpace:
    """The space with the configs outside the truth (pruned before it was measured) ruled out."""
    from dataclasses import replace

    known = frozenset(truth)

    def in_truth(c: Candidate) -> str | None:
        return None if c in known else "not in the ground truth (pruned)"

    return replace(space, constraints=(*space.constraints, ("measured", in_truth)))


def format_reports(reports: Sequence[SamplerReport]) -> str:
    budgets = sorted(reports[0].fraction_of_best) if reports else []
    head = "sampler  " + "  ".join(f"@{b:<3d} frac (hit)" for b in budgets)
    lines = [head]
    for r in reports:
        cells = [f"{r.fraction_of_best[b]:.3f} ({r.found_best[b]:.0%})".ljust(15) for b in budgets]
        lines.append(f"{r.sampler:<8} " + "  ".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autotune.benchmark", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("replay", help="compare samplers against a ground-truth JSON")
    r.add_argument("truth", type=Path)
    r.add_argument("--samplers", nargs="+", default=[k.value for k in SamplerKind])
    r.add_argument("--seeds", type=int, default=5)
    r.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from .space import DType, Problem, space_for

    truth, meta = load_truth(args.truth)
    problem = Problem(
        int(meta.get("D", 64)),
        int(meta.get("E", meta.get("D", 64))),
        DType(meta.get("dtype", "float16")),
        int(meta.get("M", 4096)),
        int(meta.get("N", 4096)),
        int(meta.get("heavy", 0)),
    )
    kind = next(iter(truth)).kind
    reports = replay(space_for(kind, problem), truth, [SamplerKind(s) for s in args.samplers], args.seeds)
    print(format_reports(reports))
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "reports": [r.__dict__ for r in reports]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
