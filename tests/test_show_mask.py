"""`attnc show-mask`: the picture is written, the summary agrees with the tile classification, and misuse is a
usage error (exit 2) with a clear message."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from attnc.dsl.analysis.tiles import SKIP, classify, plan_tiles, visited_fraction
from attnc.dsl.lower import compile_to_ir

from attnc.cli import main

from .conftest import SPECS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_png(path: Path) -> np.ndarray:
    from matplotlib import image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return image.imread(path)


def test_sliding_window_picture_and_fraction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pics" / "mask.png"
    spec = SPECS / "sliding_window.attn"
    args = [
        "show-mask",
        str(spec),
        "--shape",
        "300,300",
        "--scalar",
        "W=70",
        "--block",
        "32,32",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    pixels = _read_png(out)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200

    visited, total = map(int, re.search(r"(\d+)/(\d+) tiles visited", printed).groups())  # type: ignore[union-attr]
    att = compile_to_ir(spec.read_text(), str(spec)).attentions[0]
    cls = classify(att, plan_tiles(att), {"N": 300}, {"W": 70}, 32, 32)
    assert (visited, total) == (int(np.count_nonzero(cls != SKIP)), cls.size)
    assert f"({visited_fraction(cls):.1%})" in printed
    assert 0 < visited < total


def test_defaults_and_rectangular_shapes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "decode.png"
    assert main(["show-mask", str(SPECS / "decode.attn"), "--shape", "3,500", "-o", str(out)]) == 0
    assert "tiles 64x64" in capsys.readouterr().out  # the default tile
    _read_png(out)


def test_data_dependent_mask_draws_the_static_part(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "doc.png"
    assert main(["show-mask", str(SPECS / "document.attn"), "--shape", "128,128", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reads doc" in printed and "static part" in printed
    assert "3/4 tiles visited" in printed  # the causal conjunct still skips the tile above the diagonal
    _read_png(out)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shape", "64"], "--shape takes two positive integers"),
        (["--shape", "64,x"], "--shape takes two positive integers"),
        (["--shape", "0,64"], "--shape takes two positive integers"),
        (["--shape", "64,64", "--block", "64,0"], "--block takes two positive integers"),
        (["--shape", "64,64", "--scalar", "Q=3"], "no scalar or size named 'Q'"),
        (["--shape", "64,64", "--scalar", "W"], "--scalar takes NAME=NUMBER"),
        (["--shape", "64,64", "--scalar", "W=wide"], "--scalar takes NAME=NUMBER"),
        (["--shape", "64,64", "--scalar", "W=2.5"], "scalar W is an int"),
        (["--shape", "64,32"], "uses N for both the query and the key length"),
        (["--shape", "64,64", "--name", "nope"], "no attention named 'nope'"),
    ],
)
def test_usage_errors_exit_2(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.png"
    assert main(["show-mask", str(SPECS / "sliding_window.attn"), *extra, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_several_attentions_need_a_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "two.attn"
    body = "(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) { score = dot(q, k)\n mask = j <= i }\n"
    spec.write_text(f"attention first{body}attention second{body}")
    out = tmp_path / "b.png"
    assert main(["show-mask", str(spec), "--shape", "40,40", "-o", str(out)]) == 2
    assert "pick one with --name" in capsys.readouterr().err
    assert main(["show-mask", str(spec), "--name", "second", "--shape", "40,40", "-o", str(out)]) == 0
    assert capsys.readouterr().out.startswith("second: 1/1 tiles visited")
