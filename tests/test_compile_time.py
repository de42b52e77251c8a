"""Issue 15, compile time: what keeps a cold compile under a second besides the planner (tests/test_natten.py,
tests/test_tiles.py): the parser's tables come from a cache, and nothing imports torch's compiler stack.
Times themselves are a benchmark (benchmarks/codegen_time.py), not a test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from .conftest import REPO

_PARSE = textwrap.dedent(
    """
    import json, sys
    from attnc.dsl import parser
    spec = "attention a(q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, D]) { score = dot(q, k) }"
    parser.parse(spec)
    print(json.dumps({"dynamo": "torch._dynamo" in sys.modules}))
    """
)


def _parse_in_subprocess(cache: Path) -> tuple[dict, str]:
    env = {**os.environ, "ATTNC_CACHE_DIR": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-c", _PARSE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_parser_tables_are_cached_in_the_attnc_cache_and_a_damaged_cache_is_rebuilt(tmp_path) -> None:
    got, err = _parse_in_subprocess(tmp_path)
    (cached,) = tmp_path.glob("grammar-*.lark-cache")
    good = cached.read_bytes()
    assert got == {"dynamo": False} and err == ""
    for damage in (good[: len(good) // 2],):  # a torn pickle (lark also rebuilds on a wrong hash line)
        cached.write_bytes(damage)
        got, err = _parse_in_subprocess(tmp_path)
        assert err == "", err  # rebuilt quietly: no traceback from lark's logger
        again = cached.read_bytes()  # written back whole (a pickle: not byte-identical, same hash line)
        assert again.split(b"\n", 1)[0] == good.split(b"\n", 1)[0] and len(again) > len(good) // 2


def test_an_unwritable_cache_directory_still_parses(tmp_path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    got, err = _parse_in_subprocess(blocked / "cache")
    assert got == {"dynamo": False} and "Traceback" not in err
