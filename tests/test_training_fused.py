"""Training on the Triton path at kernel speed (issue 11): one forward + backward launches the forward kernel
once and each backward kernel once (no forward recompute, no helper thread, no reference beside the kernels),
for frozen and for learned auxiliary inputs. Kernels run under the Triton interpreter on CPU; launches are
counted by wrapping the interpreter's launch entry point, so a launch from any thread counts."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from attnc import codegen
from attnc.runtime import api, ops

from .conftest import REPO, SPECS

triton = pytest.importorskip("triton")
interpreter = pytest.importorskip("triton.runtime.interpreter")

ZOO_SPECS = REPO / "zoo" / "specs"


@contextlib.contextmanager
def count_launches() -> Iterator[collections.Counter[str]]:
    """Counter of Triton launches by kernel kind (`_alibi_bwd_dq_kernel` -> "bwd_dq") inside the block."""
    counts: collections.Counter[str] = collections.Counter()
    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        fn = self.fn
        counts[fn.__name__] += 1
        return original(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = run  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        interpreter.InterpretedFunction.run = original  # type: ignore[method-assign]


def kinds(counts: collections.Counter[str], name: str) -> dict[str, int]:
    prefix, suffix = f"_{name}_", "_kernel"
    return {k[len(prefix) : -len(suffix)]: n for k, n in counts.items() if k.startswith(prefix)}


@contextlib.contextmanager
def no_recompute() -> Iterator[None]:
    """The op's backward may neither start a helper thread to recompute the forward under autograd."""

    def refuse(fn: Callable[[], object]) -> object:
        raise AssertionError("the Triton backward recomputed under autograd (ops._with_autograd)")

    saved = ops._with_autograd
    # Generated modules call it through the runtime's api namespace (`_rt`).
    ops._with_autograd = api._with_autograd = refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        ops._with_autograd = api._with_autograd = saved  # type: ignore[assignment]


def _module(path: Path, tmp: Path):  # type: ignore[no-untyped-def]
    return codegen.compile_file(path, cache_dir=tmp)


# (spec file, entry name, builder of the inputs (B, H, M, N, D) -> kwargs, M, N)
def _qkv(B: int, H: int, G: int, M: int, N: int, D: int, E: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    E = E or D
    return {
        "q": torch.randn(B, H, M, D, generator=g).requires_grad_(),
        "k": torch.randn(B, G, N, D, generator=g).requires_grad_(),
        "v": torch.randn(B, G, N, E, generator=g).requires_grad_(),
    }


def _case(name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    B, H, N, D = 1, 2, 24, 16
    if name == "causal":
        return SPECS / "causal.attn", _qkv(B, H, H, N, N, D)
    if name == "alibi":
        return SPECS / "alibi.attn", {**_qkv(B, H, H, N, N, D), "slopes": torch.rand(H).requires_grad_()}
    if name == "t5_bias":
        table = (0.3 * torch.randn(H, 2 * 4 + 1)).requires_grad_()
        return SPECS / "t5_bias.attn", {**_qkv(B, H, H, N, N, D), "bias": table, "R": 4}
    if name == "sink":
        return SPECS / "sink.attn", {**_qkv(B, H, H, N, N, D), "sinks": torch.randn(H).requires_grad_()}
    if name == "moh_gate":
        return SPECS / "moh_gate.attn", {
            **_qkv(B, H, H, N, N, D),
            "gate": torch.rand(B, H, N).requires_grad_(),
        }
    if name == "lofit":
        offset = (0.1 * torch.randn(H, D)).requires_grad_()
        return ZOO_SPECS / "lofit.attn", {
            **_qkv(B, 2 * H, H, N, N, D),
            "offset": offset.repeat(2, 1).detach().requires_grad_(),
        }
    if name == "document":
        doc = torch.tensor([[0] * 10 + [1] * 9 + [2] * 5], dtype=torch.int32)
        return SPECS / "document.attn", {**_qkv(B, H, H, N, N, D), "doc": doc}
    if name.startswith("decode"):
        M = int(name.removeprefix("decode"))
        return SPECS / "decode.attn", _qkv(B, 2 * H, H, M, 512, D)  # 8 key tiles: two splits
    raise AssertionError(name)


# The T5 bucket table's gradient (a per-program histogram over the table) is not fused yet: it still comes
# from the reference, recomputed under autograd, which `no_recompute` refuses.
UNFUSED = pytest.mark.xfail(reason="t5_bias table gradient not fused yet (reference fallback)", strict=True)
CASES = [
    "causal",
    "alibi",
    pytest.param("t5_bias", marks=UNFUSED),
    "sink",
    "moh_gate",
    "lofit",
    "document",
    "decode1",
    "decode16",
]


@pytest.mark.parametrize("case", CASES)
def test_one_training_step_launches_each_kernel_once(case: str, tmp_path: Path) -> None:
    path, inputs = _case(case)
    mod = _module(path, tmp_path)
    name = path.stem
    fn = getattr(mod, name)
    fn(**inputs, backend="triton")  # load the kernels file (not a launch count concern)
    learned = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    with count_launches() as counts, no_recompute():
        o = fn(**inputs, backend="triton")
        (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum().backward()
    got = kinds(counts, name)
    forward = {"fwd_split": 1, "fwd_combine": 1} if case.startswith("decode") else {"fwd": 1}
    assert {k: n for k, n in got.items() if k.startswith("fwd")} == forward
    assert got.get("bwd_dq") == 1 and got.get("bwd_dkdv") == 1
    extra = {k: n for k, n in got.items() if not k.startswith(("fwd", "bwd_dq", "bwd_dkdv"))}
    assert sum(extra.values()) <= 1, extra  # at most one small reduction kernel
    assert sum(counts.values()) == sum(got.values())  # nothing but this block's kernels
    for t in learned:
        assert t.grad is not None and torch.isfinite(t.grad).all()
