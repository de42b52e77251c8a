"""`make demo` keeps working: every example spec has an oracle in examples/demo.py and matches it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


def test_demo_checks_every_example_spec(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("attnc_demo", DEMO)
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main() == 0
    out = capsys.readouterr().out
    for path in (DEMO.parent / "specs").glob("*.attn"):
        assert f"\n{path.stem} " in out
    assert "all specs match their oracles" in out
