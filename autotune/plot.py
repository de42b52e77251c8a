"""A picture of finished studies: every measured trial, the best so far, and the heuristic default."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .search import TuneResult

__all__ = ["plot_studies"]


def plot_studies(results: Sequence[TuneResult], png: Path) -> Path:
    """One panel per study: trial times (failed trials as red crosses at the top), the best-so-far curve
    and the default's time as a dashed line. Returns the file written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n = max(1, len(results))
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.6 * n), squeeze=False)
    for ax, r in zip(axes[:, 0], results, strict=False):
        recs = sorted((x for x in r.records if x.state in ("COMPLETE", "FAIL")), key=lambda x: x.number)
        xs = list(range(1, len(recs) + 1))
        ok = [(x, rec.time_ms) for x, rec in zip(xs, recs, strict=True) if rec.time_ms is not None]
        top = max((t for _, t in ok), default=1.0)
        if ok:
            ax.scatter([x for x, _ in ok], [t for _, t in ok], s=14, label="trial")
            best, curve = float("inf"), []
            for _x, t in ok:
                best = min(best, t)
                curve.append(best)
            ax.step([x for x, _ in ok], curve, where="post", color="C2", label="best so far")
        bad = [x for x, rec in zip(xs, recs, strict=True) if rec.time_ms is None]
        if bad:
            ax.scatter(bad, [top * 1.05] * len(bad), marker="x", color="C3", label="failed")
        if r.default_ms is not None:
            ax.axhline(r.default_ms, linestyle="--", color="gray", label="default")
        k = r.key
        ax.set_title(
            f"{k.attention} {k.kernel.value} {k.dtype.value} D={k.head_dim} M~{k.q_bucket} N~{k.kv_bucket} "
            f"on {k.gpu}",
            fontsize=9,
        )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("measured trial")
        ax.set_ylabel("ms")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
