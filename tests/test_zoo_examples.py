"""The zoo's example scripts run (few steps) and report a falling loss."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"zoo_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_lm_loss_goes_down(capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("train_lm")
    argv = ["--variants", "alibi,document", "--steps", "25", "--batch", "4", "--seq", "48", "--sample", "5"]
    assert mod.main(argv) == 0
    out = capsys.readouterr().out
    assert "alibi: loss" in out and "document: loss" in out


def test_train_lm_rejects_a_non_causal_variant() -> None:
    with pytest.raises(SystemExit):
        _load("train_lm").main(["--variants", "full"])


def test_vit_demo_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert _load("vit_demo").main(["--variants", "agent,biformer", "--steps", "4", "--batch", "8"]) == 0
    assert "biformer: loss" in capsys.readouterr().out
    sys.modules.pop("zoo_example_vit_demo", None)
