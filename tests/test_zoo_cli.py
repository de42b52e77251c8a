"""`attnc zoo list|show NAME`."""

from __future__ import annotations

import argparse

import pytest
from attnc.zoo.cli import add_parser, run

from attnc import zoo
from attnc.cli import main


def test_zoo_list_prints_every_variant_with_family_and_paper(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(zoo.list()) + len(zoo.BLOCKED)
    for name, line in zip(zoo.list(), lines, strict=False):
        v = zoo.variant(name)
        assert line.split()[0] == name and v.family.value in line and v.paper in line


def test_zoo_list_one_family(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "list", "--family", "routing"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == zoo.list("routing")


def test_zoo_show_prints_paper_and_spec(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "show", "sink"]) == 0
    out = capsys.readouterr().out
    assert "Xiao et al. 2024" in out and "norm  = softmax(sink = sinks[h])" in out and "SinkAttention" in out


def test_zoo_show_unknown_name_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "show", "alibbi"]) == 2
    assert "did you mean 'alibi'" in capsys.readouterr().err


def test_add_parser_is_self_contained(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="x")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["zoo", "show", "agent"])
    assert args.func is run and run(args) == 0
    assert "attention agent_aggregate" in capsys.readouterr().out
