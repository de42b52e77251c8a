"""Shared test settings. Environment knobs for the tests are read here, once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "examples" / "specs"
# ATTNC_REGEN_GOLDEN=1 rewrites tests/golden/*.expected from the current compiler.
REGEN_GOLDEN = os.environ.get("ATTNC_REGEN_GOLDEN", "") not in ("", "0")
# The fuzz suite's long (nightly) mode: `--fuzz-long` or ATTNC_FUZZ_LONG=1 (tests/test_fuzz_hypothesis.py).
FUZZ_LONG = os.environ.get("ATTNC_FUZZ_LONG", "") not in ("", "0")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-long",
        action="store_true",
        help="run tests/test_fuzz_hypothesis.py in its long mode (ATTNC_FUZZ_EXAMPLES examples, default 20000)",
    )


def pytest_configure(config: pytest.Config) -> None:
    global FUZZ_LONG
    if config.getoption("--fuzz-long"):
        FUZZ_LONG = True  # read by the fuzz module when it is imported, after this


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Never touch the user's cache from tests."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ATTNC_CACHE_DIR", str(tmp_path_factory.mktemp("attnc-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """Test tensors are tiny: with pytest-xdist, workers each running a multi-threaded OpenMP pool
    oversubscribe the cores and make every small op wait."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def compiled(tmp_path_factory: pytest.TempPathFactory):
    """`compiled("alibi")`: the module generated from examples/specs/alibi.attn, once per session."""
    import functools

    from attnc import codegen

    cache = tmp_path_factory.mktemp("attnc-compiled")

    @functools.cache
    def get(spec: str):
        return codegen.compile_file(SPECS / f"{spec}.attn", cache_dir=cache)

    return get
