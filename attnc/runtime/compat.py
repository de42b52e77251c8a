"""Thin shims over torch APIs whose public spelling costs more than the feature (kept in one place so a torch
upgrade that changes them fails one test, tests/test_runtime.py::test_assume_constant_result_matches_dynamo)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

_F = TypeVar("_F", bound=Callable[..., object])

_DYNAMO_MARK = "_dynamo_marked_constant"


def assume_constant_result(fn: _F) -> _F:
    """`torch.compiler.assume_constant_result` without importing torch._dynamo.

    The public decorator imports torch._dynamo (and with it sympy and most of torch's compiler stack, about
    2.5 s on a CI-size machine), which made importing any module with a linear-form block cost more than the
    whole compile of the spec (issue 15). Dynamo's decorator only marks the function; the mark is read when a
    `torch.compile` trace meets the call, by which time dynamo is loaded anyway. So mark it the same way, and
    defer to dynamo itself when it is already imported."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        return dynamo.assume_constant_result(fn)
    setattr(fn, _DYNAMO_MARK, True)
    return fn
