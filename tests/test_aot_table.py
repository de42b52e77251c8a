"""benchmarks/aot_table.py: before/after register tables, and an earlier comparison standing in for tables
that were not re-measured (only where the measured ones agree with it)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

TOOL = Path(__file__).resolve().parent.parent / "benchmarks" / "aot_table.py"
HEADER = "kernel  target  warps  stages  smem B  regs  spill B  wgmma  config\n---\n"


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("attnc_aot_table", TOOL)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _table(path: Path, rows: dict[str, tuple[int, int]]) -> None:
    lines = [f"{k}  sm_90  4  2  1024  {r}  {s}  yes  _BLOCK_M=64" for k, (r, s) in rows.items()]
    path.write_text(HEADER + "\n".join(lines) + "\n")


def test_earlier_comparison_fills_missing_tables_only_if_measured_ones_agree(
    tool: ModuleType, tmp_path: Path
) -> None:
    before, after = tmp_path / "before", tmp_path / "after"
    before.mkdir()
    after.mkdir()
    _table(before / "a_d64.txt", {"_a_fwd_kernel": (100, 0)})
    (before / "b_d64.txt").write_text("")  # a run that did not finish
    _table(after / "a_d64.txt", {"_a_fwd_kernel": (99, 0)})
    _table(after / "b_d64.txt", {"_b_fwd_kernel": (121, 0)})
    earlier = {"a_d64": {"_a_fwd_kernel": (100, 0)}, "b_d64": {"_b_fwd_kernel": (120, 0)}}
    rows = {r["table"]: r for r in tool.compare(before, after, earlier)}
    assert rows["a_d64"]["before_from"] == "measured" and rows["a_d64"]["regs_after"] == 99
    assert rows["b_d64"]["before_from"] == "earlier comparison" and rows["b_d64"]["regs_before"] == 120
    out = tmp_path / "cmp.json"
    assert tool.main([str(before), str(after), "--json", str(out)]) == 0  # a alone: not worse
    assert json.loads(out.read_text())["rows"][0]["regs_after"] == 99
    with pytest.raises(SystemExit, match="differs from the earlier"):
        tool.compare(before, after, {"a_d64": {"_a_fwd_kernel": (101, 0)}})


def test_schedules_read_from_todays_tables(tool: ModuleType, tmp_path: Path) -> None:
    """What benchmarks/aot_launch_before.py shares with the after side: each attention kernel's tiles, warps and
    stages by kind; the linear core's `_lin_*` rows (whose names end like a dQ's) are not read."""
    table = tmp_path / "retention_d64.txt"
    table.write_text(
        HEADER
        + "_retention_fwd_kernel  sm_90  8  3  1024  128  0  yes  yes  770  _BLOCK_D=64 _BLOCK_M=128 _BLOCK_N=64\n"
        + "_retention_bwd_dq_kernel  sm_90  4  2  1024  101  0  no  yes  428  _BLOCK_M=32 _BLOCK_N=16 _TMA=True\n"
        + "_lin_bwd_dq_kernel  sm_90  8  2  81920  168  0  yes  no  213  BLOCK_D=128 BLOCK_V=64 CHUNK=64\n"
    )
    assert tool.read_schedules(table) == {"fwd": [128, 64, 8, 3], "bwd_dq": [32, 16, 4, 2]}
