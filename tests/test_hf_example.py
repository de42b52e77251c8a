"""examples/hf_llama.py runs (a few steps): a transformers Llama trains and generates with attnc operators."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

if os.environ.get("CI", "").lower() == "true":
    import transformers  # noqa: F401  (CI installs the `hf` extra: a missing transformers is a failure there)
else:
    pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_llama.py"


def test_hf_llama_example_trains_and_generates(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("hf_llama_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--steps", "4", "--batch", "4", "--seq", "32", "--sample", "12"]
    assert mod.main(argv) == 0
    out = capsys.readouterr().out
    for variant in ("alibi", "sliding_window"):
        assert f"{variant}: loss" in out
    assert out.count("generate(): 'Shall I compare thee") == 2
