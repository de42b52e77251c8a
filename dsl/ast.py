"""The surface syntax tree of a `.attn` file: frozen dataclasses that keep source spans.

The AST mirrors what the user wrote (a `let` is still a name, `clamp` is still a call); `dsl.check`
gives it meaning and `dsl.lower` turns it into the IR that backends consume.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Span


@dataclass(frozen=True)
class Expr:
    span: Span = field(compare=False, repr=False)

    def children(self) -> tuple[Expr, ...]:
        return ()


@dataclass(frozen=True)
class IntLit(Expr):
    value: int


@dataclass(frozen=True)
class FloatLit(Expr):
    value: float


@dataclass(frozen=True)
class BoolLit(Expr):
    value: bool


@dataclass(frozen=True)
class Name(Expr):
    id: str


@dataclass(frozen=True)
class Call(Expr):
    func: str
    args: tuple[Expr, ...]

    def children(self) -> tuple[Expr, ...]:
        return self.args


@dataclass(frozen=True)
class Index(Expr):
    """`table[e1, e2, ...]`: a load from an auxiliary tensor."""

    tensor: str
    indices: tuple[Expr, ...]

    def children(self) -> tuple[Expr, ...]:
        return self.indices


@dataclass(frozen=True)
class Unary(Expr):
    op: str  # "-", "+", "not"
    operand: Expr

    def children(self) -> tuple[Expr, ...]:
        return (self.operand,)


@dataclass(frozen=True)
class Binary(Expr):
    op: str  # + - * / // % ** < <= > >= == != and or
    left: Expr
    right: Expr

    def children(self) -> tuple[Expr, ...]:
        return (self.left, self.right)


@dataclass(frozen=True)
class TensorParam:
    name: str
    shape: tuple[Expr, ...]
    dtype: str | None
    span: Span = field(compare=False, repr=False)
    dtype_span: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ScalarParam:
    name: str
    type: str  # "int" | "float"
    default: Expr | None
    span: Span = field(compare=False, repr=False)


Param = TensorParam | ScalarParam


@dataclass(frozen=True)
class Stmt:
    span: Span = field(compare=False, repr=False)


@dataclass(frozen=True)
class Let(Stmt):
    name: str
    value: Expr


@dataclass(frozen=True)
class ScoreStmt(Stmt):
    value: Expr


@dataclass(frozen=True)
class MaskStmt(Stmt):
    value: Expr


@dataclass(frozen=True)
class OutputStmt(Stmt):
    value: Expr


@dataclass(frozen=True)
class FeatureStmt(Stmt):
    target: str
    value: Expr
    target_span: Span = field(compare=False, repr=False, default=Span(0, 0))


@dataclass(frozen=True)
class StateStmt(Stmt):
    """`state S = <update>`: a matrix state and its per-token update (docs/linear.md, "State recurrences")."""

    name: str
    value: Expr
    name_span: Span = field(compare=False, repr=False, default=Span(0, 0))


@dataclass(frozen=True)
class ReadStmt(Stmt):
    """`read = S @ q'`: what a state block returns at each token."""

    value: Expr


@dataclass(frozen=True)
class KwArg:
    name: str
    value: Expr
    span: Span = field(compare=False, repr=False)


@dataclass(frozen=True)
class NormStmt(Stmt):
    kind: str
    kwargs: tuple[KwArg, ...]
    kind_span: Span = field(compare=False, repr=False, default=Span(0, 0))


@dataclass(frozen=True)
class Attention:
    name: str
    params: tuple[Param, ...]
    body: tuple[Stmt, ...]
    span: Span = field(compare=False, repr=False)
    name_span: Span = field(compare=False, repr=False, default=Span(0, 0))


@dataclass(frozen=True)
class SpecFile:
    filename: str
    source: str
    attentions: tuple[Attention, ...]
