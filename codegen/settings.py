"""Every environment variable attnc reads, read in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    cache_dir: Path  # ATTNC_CACHE_DIR: generated-module cache (default: the user cache dir)
    debug: bool  # ATTNC_DEBUG=1: show Python tracebacks for internal errors in the CLI

    @staticmethod
    def from_env() -> Settings:
        env = os.environ
        default_cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attnc"
        return Settings(
            cache_dir=Path(env.get("ATTNC_CACHE_DIR") or default_cache),
            debug=env.get("ATTNC_DEBUG", "") not in ("", "0"),
        )


def settings() -> Settings:
    """Read afresh on each call so that tests (and long-lived processes) see changes."""
    return Settings.from_env()
