"""Which index variables each root expression of an attention may use: the one table of the language's scopes.

`docs/language.md` ("Index variables") states the rule; lowering checks spec text against this table
(`dsl.lower`), and the emitters bind exactly these variables when they compile a root (the Triton kernels
through `codegen.triton.kernels`; the reference's closure parameters follow the same order). A root with an
element variable (`o`, `q`, `k`) also sees that element.
"""

from __future__ import annotations

import enum

from .ir import Var


class Root(enum.Enum):
    """A root expression of an `attention` block (the value is how errors name it)."""

    SCORE = "score"
    MASK = "mask"
    SINK = "softmax sink"
    BIAS = "sigmoid bias"
    EPS = "sum eps"
    OUTPUT = "output"
    FEATURE_Q = "feature q"
    FEATURE_K = "feature k"
    STATE = "a state update"  # the per-token gates and vectors of `state S = ...` and `read = ...`


_B, _H, _HK, _I, _J, _E, _D = Var.B, Var.H, Var.HK, Var.I, Var.J, Var.E, Var.D

# In order: the order of a reference closure's parameters after its element (e.g. `_output(o, b, h, hk, i, e)`).
ROOT_VARS: dict[Root, tuple[Var, ...]] = {
    Root.SCORE: (_B, _H, _HK, _I, _J),
    Root.MASK: (_B, _H, _HK, _I, _J),
    Root.SINK: (_B, _H, _HK, _I),
    Root.BIAS: (_B, _H, _HK, _I, _J),
    Root.EPS: (_B, _H, _HK, _I),
    Root.OUTPUT: (_B, _H, _HK, _I, _E),
    Root.FEATURE_Q: (_B, _H, _HK, _I, _D),
    Root.FEATURE_K: (_B, _HK, _J, _D),
    # One token i at a time; d indexes key-side vectors (q, k, gates), e value-side ones (v).
    Root.STATE: (_B, _H, _HK, _I, _D, _E),
}

# The element a root transforms: the raw output row, the raw q row, the raw k row.
ROOT_ELEMENT: dict[Root, str] = {Root.OUTPUT: "o", Root.FEATURE_Q: "q", Root.FEATURE_K: "k"}


def root_names(root: Root) -> tuple[str, ...]:
    """The names a root's expression may use: its element first (if any), then its index variables."""
    elem = (ROOT_ELEMENT[root],) if root in ROOT_ELEMENT else ()
    return (*elem, *(v.value for v in ROOT_VARS[root]))
