"""The IR of a state block (`state S = ...`, `read = ...`): matrix expressions over per-token element-wise IR.

A state block declares a matrix state S of shape [E, D] per (batch, head) and its update for token i. The
update is a `Mat` expression: the state itself, the identity, `diag(x)`, `outer(x, y)`, products (`@`), sums,
and scalings by per-token scalars. Its leaves are ordinary element-wise IR `Node`s over b, h, hk, i and d
(key side: q, k, gates) or e (value side: v), with `ELEM` nodes "q", "k", "v" for the token's rows. The
read is `coef * (S @ x)` with a key-side vector x. `dsl.analysis.recurrence` decides whether an update has
the structure the runtime computes (S <- S (Diag(w) + a bᵀ) + v' k'ᵀ) and maps it onto the runtime's inputs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import Span
from .ir import DType, Layout, Node, Op, Param, TensorParam, Var, uses, walk

# What a state block's update may be: the hint of every structure error (dsl.state, dsl.analysis.recurrence).
SUPPORTED = (
    "supported: state S = S @ T + outer(v', k') with T = c * I, diag(w), outer(a, b) and sums/products of "
    "these that form Diag(w) + a bᵀ; gates are per-token expressions of q/k/v rows and auxiliary tensors"
)


class Side(enum.Enum):
    """Which axis an element-wise leaf varies along (besides the token)."""

    SCALAR = "scalar"  # one value per token (b, h, i)
    KEY = "key"  # a vector over d (q, k, key-side gates)
    VALUE = "value"  # a vector over e (v)


class MatKind(enum.Enum):
    """The shape of a matrix expression."""

    STATE = "[E, D]"  # the state and writes outer(value, key)
    KEY = "[D, D]"  # transitions: I, diag(key), outer(key, key)


class MatOp(enum.Enum):
    STATE = "state"  # S, the state before the token
    IDENTITY = "identity"  # I ([D, D])
    DIAG = "diag"  # diag(x), x a key-side vector or a scalar; args: (), leaves: (x,)
    OUTER = "outer"  # outer(x, y) = x yᵀ; leaves: (x, y)
    MATMUL = "matmul"  # args: (left, right)
    ADD = "add"
    SUB = "sub"
    NEG = "neg"
    SCALE = "scale"  # leaves: (c,), a per-token scalar; args: (m,)


@dataclass(frozen=True)
class Mat:
    op: MatOp
    kind: MatKind
    args: tuple[Mat, ...] = ()
    leaves: tuple[Node, ...] = ()
    span: Span | None = None  # where the sub-expression is written (errors point there)


@dataclass(frozen=True)
class Read:
    """o_i = coef · S_i x: `coef` a per-token scalar, x a key-side vector."""

    coef: Node
    vector: Node
    span: Span | None = None


@dataclass(frozen=True)
class Recurrence:
    """One state block. `params` and `layout` as in `ir.Attention` (q and k share their length)."""

    name: str
    params: tuple[Param, ...]
    layout: Layout
    state: str  # the state's name
    update: Mat
    read: Read
    update_span: Span | None = None

    @property
    def tensors(self) -> tuple[TensorParam, ...]:
        return tuple(p for p in self.params if isinstance(p, TensorParam))

    @property
    def aux_tensors(self) -> tuple[TensorParam, ...]:
        return tuple(p for p in self.tensors if p.role.value == "aux")

    @property
    def scalars(self) -> tuple:
        return tuple(p for p in self.params if not isinstance(p, TensorParam))

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


def side_of(node: Node) -> Side | None:
    """The side an element-wise expression varies along; None when it mixes both (an error to report)."""
    key = uses(node, lambda n: (n.op is Op.VAR and n.attr is Var.D) or (n.op is Op.ELEM and n.attr in "qk"))
    value = uses(node, lambda n: (n.op is Op.VAR and n.attr is Var.E) or (n.op is Op.ELEM and n.attr == "v"))
    if key and value:
        return None
    return Side.KEY if key else Side.VALUE if value else Side.SCALAR


class StateVerifyError(AssertionError):
    """A malformed state IR: a compiler bug, never a spec error."""


def verify(rec: Recurrence) -> None:
    """Every matrix node's kind follows from its operands, and leaves are float element-wise expressions
    that use only the state context's variables (no j: one token at a time)."""

    def leaf(n: Node, allowed: tuple[Side, ...]) -> None:
        if n.dtype is not DType.FLOAT:
            raise StateVerifyError(f"{rec.name}: a state leaf is not a float ({n.dtype})")
        if any(x.op is Op.VAR and x.attr is Var.J for x in walk([n])) or any(
            x.op is Op.DOT for x in walk([n])
        ):
            raise StateVerifyError(f"{rec.name}: a state leaf uses j or dot(q, k)")
        if side_of(n) not in allowed:
            raise StateVerifyError(f"{rec.name}: a leaf has side {side_of(n)}, expected one of {allowed}")

    stack = [rec.update]
    while stack:
        m = stack.pop()
        stack.extend(m.args)
        op, kind = m.op, m.kind
        kinds = [a.kind for a in m.args]
        ok = {
            MatOp.STATE: kind is MatKind.STATE and not m.args,
            MatOp.IDENTITY: kind is MatKind.KEY and not m.args,
            MatOp.DIAG: kind is MatKind.KEY and len(m.leaves) == 1,
            MatOp.OUTER: len(m.leaves) == 2,
            MatOp.MATMUL: len(kinds) == 2 and kinds[1] is MatKind.KEY and kind is kinds[0],
            MatOp.ADD: len(kinds) == 2 and kinds[0] is kinds[1] is kind,
            MatOp.SUB: len(kinds) == 2 and kinds[0] is kinds[1] is kind,
            MatOp.NEG: kinds == [kind],
            MatOp.SCALE: kinds == [kind] and len(m.leaves) == 1,
        }[op]
        if not ok:
            raise StateVerifyError(f"{rec.name}: malformed {op.value} node of kind {kind.value}")
        if op is MatOp.DIAG:
            leaf(m.leaves[0], (Side.KEY, Side.SCALAR))
        elif op is MatOp.OUTER:
            left = Side.VALUE if kind is MatKind.STATE else Side.KEY
            leaf(m.leaves[0], (left, Side.SCALAR))
            leaf(m.leaves[1], (Side.KEY, Side.SCALAR))
        elif op is MatOp.SCALE:
            leaf(m.leaves[0], (Side.SCALAR,))
    leaf(rec.read.coef, (Side.SCALAR,))
    leaf(rec.read.vector, (Side.KEY, Side.SCALAR))
