"""Shared test settings. Environment knobs for the tests are read here, once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "examples" / "specs"
# ATTNC_REGEN_GOLDEN=1 rewrites tests/golden/*.expected from the current compiler.
REGEN_GOLDEN = os.environ.get("ATTNC_REGEN_GOLDEN", "") not in ("", "0")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Never touch the user's cache from tests."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ATTNC_CACHE_DIR", str(tmp_path_factory.mktemp("attnc-cache")))
    yield
    mp.undo()
