"""The typed IR every backend consumes.

An expression is a `Node`: an `Op`, a result `DType`, argument nodes and an attribute. Nodes are immutable
and hash-consed by structure (the hash is computed once, at construction), so equal sub-expressions compare
equal in O(1) and `linearize` turns a DAG into straight-line code with common sub-expressions shared.

An attention variant is an `Attention`: parameters, the index-space `Layout`, and the expressions for the
optional feature maps, the score, the mask, the normalisation and the output epilogue.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

LANGUAGE_VERSION = "1.0"


class DType(enum.Enum):
    BOOL = "bool"
    INT = "int"
    FLOAT = "float"


class Var(enum.Enum):
    """Index variables of the iteration space (docs/language.md, "Index variables")."""

    B = "b"  # batch
    H = "h"  # query head
    HK = "hk"  # key/value head: h // (H // G)
    I = "i"  # query position  # noqa: E741
    J = "j"  # key position
    E = "e"  # output channel (in `output`)
    D = "d"  # feature channel (in `feature q|k`)


class Op(enum.Enum):
    CONST = "const"  # attr: the Python value
    VAR = "var"  # attr: Var
    SIZE = "size"  # attr: symbol name
    SCALAR = "scalar"  # attr: parameter name
    LOAD = "load"  # attr: tensor name; args: indices
    DOT = "dot"  # Σ_d φ(q)[b,h,i,d]·ψ(k)[b,hk,j,d]
    ELEM = "elem"  # attr: "q" | "k" (in a feature map) or "o" (in the output epilogue)
    # unary
    NEG = "neg"
    NOT = "not"
    ABS = "abs"
    EXP = "exp"
    EXP2 = "exp2"
    LOG = "log"
    LOG2 = "log2"
    SQRT = "sqrt"
    RSQRT = "rsqrt"
    TANH = "tanh"
    SIGMOID = "sigmoid"
    RELU = "relu"
    ELU = "elu"
    FLOOR = "floor"
    CEIL = "ceil"
    TO_FLOAT = "to_float"
    # binary
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"  # true division, always float
    FLOORDIV = "floordiv"  # floor semantics (Python's)
    MOD = "mod"  # floor semantics: the result has the sign of the divisor
    POW = "pow"  # real power, always float
    MIN = "min"
    MAX = "max"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    EQ = "eq"
    NE = "ne"
    AND = "and"
    OR = "or"
    # ternary
    WHERE = "where"


UNARY_FLOAT_OPS = frozenset(
    {Op.EXP, Op.EXP2, Op.LOG, Op.LOG2, Op.SQRT, Op.RSQRT, Op.TANH, Op.SIGMOID, Op.ELU, Op.TO_FLOAT}
)
UNARY_SAME_OPS = frozenset({Op.NEG, Op.ABS, Op.RELU})
ARITH_OPS = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.FLOORDIV, Op.MOD, Op.POW, Op.MIN, Op.MAX})
COMPARE_OPS = frozenset({Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE})
LOGIC_OPS = frozenset({Op.AND, Op.OR})
LEAF_OPS = frozenset({Op.CONST, Op.VAR, Op.SIZE, Op.SCALAR, Op.DOT, Op.ELEM})


@dataclass(frozen=True, eq=False)
class Node:
    op: Op
    dtype: DType
    args: tuple[Node, ...] = ()
    attr: object = None
    _hash: int = field(init=False, repr=False)
    depth: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "_hash", hash((self.op, self.dtype, self.attr, tuple(a._hash for a in self.args)))
        )
        object.__setattr__(self, "depth", 1 + max((a.depth for a in self.args), default=0))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Node) or self._hash != other._hash:
            return False
        # Iterative, memoised comparison: deep or heavily shared DAGs neither recurse nor blow up.
        stack: list[tuple[Node, Node]] = [(self, other)]
        seen: set[tuple[int, int]] = set()
        while stack:
            a, b = stack.pop()
            if a is b or (id(a), id(b)) in seen:
                continue
            seen.add((id(a), id(b)))
            if (
                a._hash != b._hash
                or a.op is not b.op
                or a.dtype is not b.dtype
                or type(a.attr) is not type(b.attr)
                or a.attr != b.attr
                or len(a.args) != len(b.args)
            ):
                return False
            stack.extend(zip(a.args, b.args, strict=True))
        return True

    def __repr__(self) -> str:
        return f"Node({format_expr(self)})"


# ---- constructors -------------------------------------------------------------------------------------------


def const(value: bool | int | float) -> Node:
    if isinstance(value, bool):
        return Node(Op.CONST, DType.BOOL, (), value)
    if isinstance(value, int):
        return Node(Op.CONST, DType.INT, (), value)
    return Node(Op.CONST, DType.FLOAT, (), float(value))


def var(v: Var) -> Node:
    return Node(Op.VAR, DType.INT, (), v)


def size(name: str) -> Node:
    return Node(Op.SIZE, DType.INT, (), name)


def walk(roots: Iterable[Node]) -> Iterator[Node]:
    """Every distinct node reachable from `roots`, each once (iterative: no recursion limits)."""
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        yield n
        stack.extend(n.args)


def linearize(roots: Iterable[Node]) -> list[Node]:
    """Topological order (arguments first) of the distinct nodes under `roots`; equal nodes appear once."""
    order: list[Node] = []
    done: set[Node] = set()
    for root in roots:
        stack: list[tuple[Node, bool]] = [(root, False)]
        while stack:
            n, expanded = stack.pop()
            if n in done:
                continue
            if expanded:
                done.add(n)
                order.append(n)
                continue
            stack.append((n, True))
            stack.extend((a, False) for a in reversed(n.args) if a not in done)
    return order


def uses(node: Node | None, pred) -> bool:
    return node is not None and any(pred(n) for n in walk([node]))


def uses_var(node: Node | None, v: Var) -> bool:
    return uses(node, lambda n: n.op is Op.VAR and n.attr is v)


def is_uniform(node: Node) -> bool:
    """True when the value is the same at every point of the iteration space (sizes, scalars, constants)."""
    return not any(n.op in (Op.VAR, Op.LOAD, Op.DOT, Op.ELEM) for n in walk([node]))


# ---- printing -----------------------------------------------------------------------------------------------

INFIX = {
    Op.ADD: "+",
    Op.SUB: "-",
    Op.MUL: "*",
    Op.DIV: "/",
    Op.FLOORDIV: "//",
    Op.MOD: "%",
    Op.POW: "**",
    Op.LT: "<",
    Op.LE: "<=",
    Op.GT: ">",
    Op.GE: ">=",
    Op.EQ: "==",
    Op.NE: "!=",
    Op.AND: "and",
    Op.OR: "or",
}


def format_expr(node: Node) -> str:
    """A compact, fully parenthesised rendering (used by `attnc show-ir` and in messages)."""
    if node.depth > 60:
        return f"<{node.op.value} expression of depth {node.depth}>"
    op = node.op
    if op is Op.CONST:
        v = node.attr
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return repr(v) if math.isfinite(v) else str(v)
        return str(v)
    if op is Op.VAR:
        return node.attr.value  # type: ignore[union-attr]
    if op in (Op.SIZE, Op.SCALAR, Op.ELEM):
        return str(node.attr)
    if op is Op.DOT:
        return "dot(q, k)"
    if op is Op.LOAD:
        return f"{node.attr}[{', '.join(format_expr(a) for a in node.args)}]"
    if op in INFIX:
        a, b = node.args
        return f"({format_expr(a)} {INFIX[op]} {format_expr(b)})"
    if op is Op.NEG:
        return f"-{format_expr(node.args[0])}"
    if op is Op.NOT:
        return f"not {format_expr(node.args[0])}"
    return f"{op.value}({', '.join(format_expr(a) for a in node.args)})"


# ---- the attention program ----------------------------------------------------------------------------------


class Role(enum.Enum):
    Q = "q"
    K = "k"
    V = "v"
    AUX = "aux"


class TensorType(enum.Enum):
    """Declared element type of a tensor parameter (`float` and `int` accept any width)."""

    FLOAT = "float"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    INT = "int"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"

    @property
    def kind(self) -> DType:
        if self is TensorType.BOOL:
            return DType.BOOL
        return DType.INT if self.value.startswith("int") else DType.FLOAT


@dataclass(frozen=True)
class TensorParam:
    name: str
    role: Role
    shape: tuple[Node, ...]  # SIZE, integer CONST, or an int expression of sizes and int scalars
    type: TensorType

    @property
    def differentiable(self) -> bool:
        return self.type.kind is DType.FLOAT


@dataclass(frozen=True)
class ScalarParam:
    name: str
    dtype: DType  # INT or FLOAT
    default: Node | None  # uniform expression of sizes and constants


Param = TensorParam | ScalarParam


@dataclass(frozen=True)
class Layout:
    """Which size symbol (or constant) spans each axis of the iteration space."""

    batch: Node
    heads: Node  # H: query heads
    kv_heads: Node  # G: key/value heads (== heads unless grouped-query attention)
    q_len: Node  # M
    kv_len: Node  # N
    head_dim: Node  # D: q/k channel
    v_dim: Node  # E: v / output channel

    def extent(self, v: Var) -> Node:
        return {
            Var.B: self.batch,
            Var.H: self.heads,
            Var.HK: self.kv_heads,
            Var.I: self.q_len,
            Var.J: self.kv_len,
            Var.E: self.v_dim,
            Var.D: self.head_dim,
        }[v]


class NormKind(enum.Enum):
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"
    NONE = "none"
    SUM = "sum"

    @property
    def is_linear_family(self) -> bool:
        return self in (NormKind.NONE, NormKind.SUM)


@dataclass(frozen=True)
class Norm:
    kind: NormKind
    sink: Node | None = None  # softmax: an extra logit in each row's normaliser (b, h, i)
    bias: Node | None = None  # sigmoid: added to the score before the sigmoid
    eps: Node | None = None  # sum: added to the normaliser


@dataclass(frozen=True)
class Attention:
    name: str
    params: tuple[Param, ...]
    layout: Layout
    score: Node
    mask: Node | None
    norm: Norm
    feature_q: Node | None = None
    feature_k: Node | None = None
    output: Node | None = None

    @property
    def tensors(self) -> tuple[TensorParam, ...]:
        return tuple(p for p in self.params if isinstance(p, TensorParam))

    @property
    def aux_tensors(self) -> tuple[TensorParam, ...]:
        return tuple(p for p in self.tensors if p.role is Role.AUX)

    @property
    def scalars(self) -> tuple[ScalarParam, ...]:
        return tuple(p for p in self.params if isinstance(p, ScalarParam))

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def roots(self) -> dict[str, Node]:
        """The named expressions of the program, in evaluation order."""
        named = {
            "feature q": self.feature_q,
            "feature k": self.feature_k,
            "score": self.score,
            "mask": self.mask,
            "sink": self.norm.sink,
            "bias": self.norm.bias,
            "eps": self.norm.eps,
            "output": self.output,
        }
        return {k: v for k, v in named.items() if v is not None}


@dataclass(frozen=True)
class Program:
    """All attention blocks of one spec file."""

    filename: str
    source_sha256: str
    attentions: tuple[Attention, ...]
    # State blocks (`state S = ...`, dsl.state_ir.Recurrence): matrix-state recurrences of the delta-rule
    # family, kept apart because no score/normalisation backend applies to them.
    recurrences: tuple = ()
