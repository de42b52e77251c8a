"""Every environment variable attnc reads, read in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    cache_dir: Path  # ATTNC_CACHE_DIR: generated-module cache (default: the user cache dir)
    debug: bool  # ATTNC_DEBUG=1: show Python tracebacks for internal errors in the CLI
    # The autotuner (autotune/). Generated modules mirror the last two in `_tune_settings` (they import
    # nothing from attnc); tests/test_autotune_runtime.py checks that both read the same values.
    tune_dir: Path  # studies' default journal storage: <cache_dir>/tune
    tuned_table: Path  # ATTNC_TUNED_CONFIGS: the best-config table the runtime reads (<tune_dir>/best.json)
    autotune: bool  # ATTNC_AUTOTUNE=1: a generated module may tune an untuned key on first call
    # ATTNC_TMA: "auto" (default: tensor descriptors where the GPU has TMA, sm_90+, and the inputs qualify),
    # "1" (wherever the inputs qualify, also under the Triton interpreter: tests) or "0" (pointer loads only)
    tma: str

    @staticmethod
    def from_env() -> Settings:
        env = os.environ
        default_cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnc"
        cache_dir = Path(env.get("ATTNC_CACHE_DIR") or default_cache)
        return Settings(
            cache_dir=cache_dir,
            debug=env.get("ATTNC_DEBUG", "") not in ("", "0"),
            tune_dir=cache_dir / "tune",
            tuned_table=Path(env.get("ATTNC_TUNED_CONFIGS") or cache_dir / "tune" / "best.json"),
            autotune=env.get("ATTNC_AUTOTUNE", "") not in ("", "0"),
            tma=_tma_mode(env.get("ATTNC_TMA", "auto")),
        )


def _tma_mode(value: str) -> str:
    v = value.strip().lower() or "auto"
    if v not in ("auto", "1", "0"):
        raise ValueError(f"ATTNC_TMA must be auto, 1 or 0, got {value!r}")
    return v


def settings() -> Settings:
    """Read afresh on each call so that tests (and long-lived processes) see changes."""
    return Settings.from_env()
