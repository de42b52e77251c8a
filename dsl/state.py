"""AST -> state IR for state blocks: `state S = <update>` and `read = <expr>` (docs/linear.md).

The update is read as a matrix expression: `S` (the state before the token), `I`, `diag(x)`, `outer(x, y)`,
`@`, `+`, `-` and scalings by per-token scalars. Everything else is an element-wise expression over the
token's rows q, k, v (vectors: q and k over d, v over e) and auxiliary loads at b, h, hk, i, d or e, lowered
by the ordinary lowerer in the `a state update` context. Structure that is not linear algebra of these
shapes is a `SpecError` here; whether the algebra has the supported form (diagonal plus rank 1) is decided
by `dsl.analysis.recurrence`.
"""

from __future__ import annotations

from . import ast as A
from . import builder as bld
from .analysis.recurrence import analyse
from .check import Scope
from .errors import Span, SpecError
from .ir import DType, Layout, Node, Op, ScalarParam, TensorParam, const
from .lower import BLOCK_KINDS, Ctx, _Lowerer
from .state_ir import SUPPORTED, Mat, MatKind, MatOp, Read, Recurrence, Side, side_of, verify

_MATRIX_FUNCS = {"outer": 2, "diag": 1}


def is_state_block(att: A.Attention) -> bool:
    return any(isinstance(st, A.StateStmt | A.ReadStmt) for st in att.body)


def _check_state_body(att: A.Attention) -> tuple[A.StateStmt, A.ReadStmt]:
    state = [st for st in att.body if isinstance(st, A.StateStmt)]
    read = [st for st in att.body if isinstance(st, A.ReadStmt)]
    for st in att.body:
        if isinstance(st, A.Let | A.StateStmt | A.ReadStmt):
            continue
        if isinstance(st, A.NormStmt) and st.kind == "none" and not st.kwargs:
            continue  # `norm = none` says what a state block is anyway
        what = {
            A.ScoreStmt: "score",
            A.MaskStmt: "mask",
            A.NormStmt: "norm",
            A.OutputStmt: "output",
            A.FeatureStmt: "feature",
        }[type(st)]
        raise SpecError(
            f"a state block cannot have a '{what}' statement",
            st.span,
            hint="a state block computes o_i = read at every token i; write feature maps and gates inside "
            "'state' and 'read' (e.g. read = S @ (q * D ** -0.5))",
        )
    if len(state) != 1:
        at = state[1].span if state else att.name_span
        raise SpecError(
            "a state block declares exactly one 'state'"
            if state
            else f"attention '{att.name}' has no 'state'",
            at,
            hint="e.g. state S = S @ (I - beta[b, h, i] * outer(k, k)) + outer(beta[b, h, i] * v, k)",
        )
    if len(read) != 1:
        at = read[1].span if read else att.name_span
        raise SpecError(
            "'read' is defined twice" if read else f"state block '{att.name}' has no 'read'",
            at,
            hint="add e.g. 'read = S @ q'",
        )
    return state[0], read[0]


class _StateLowerer(_Lowerer):
    """The ordinary lowerer, plus q/k/v as the token's rows and the matrix forms of the update."""

    def __init__(self, att: A.Attention, scope: Scope, state: str) -> None:
        super().__init__(att, scope)
        self.state = state

    def name(self, e: A.Name, ctx: Ctx, before: int) -> Node:
        if ctx is Ctx.STATE and e.id in ("q", "k", "v"):
            return Node(Op.ELEM, DType.FLOAT, (), e.id)
        if ctx is Ctx.STATE and e.id == self.state:
            raise SpecError(
                f"the state '{self.state}' is used inside a gate or vector expression: a state-dependent "
                "gate is not supported",
                e.span,
                hint="gates must not depend on the state (the update must be linear in it); " + SUPPORTED,
            )
        return super().name(e, ctx, before)

    # ---- matrix expressions -----------------------------------------------------------------------------

    def _is_identity(self, name: str) -> bool:
        """`I` is the identity unless the block defines the name (a size symbol, parameter or let)."""
        sc = self.scope
        return name == "I" and not (
            name in sc.sizes or name in sc.scalars or name in sc.tensors or name in self.lets
        )

    def _let_of(self, e: A.Expr, before: int) -> A.Expr | None:
        if isinstance(e, A.Name) and e.id in self.lets and self.lets[e.id].index < before:
            return self.lets[e.id].stmt.value
        return None

    def is_matrix(self, e: A.Expr, before: int) -> bool:
        """Does the expression (syntactically) hold a matrix: S, I, diag, outer or @?"""
        stack = [e]
        while stack:
            x = stack.pop()
            if isinstance(x, A.Name):
                if x.id == self.state or self._is_identity(x.id):
                    return True
                let = self._let_of(x, before)
                if let is not None:
                    stack.append(let)
            elif isinstance(x, A.Call) and x.func in _MATRIX_FUNCS:
                return True
            elif isinstance(x, A.Binary) and x.op == "@":
                return True
            elif isinstance(x, A.Unary | A.Binary):
                stack.extend(x.children())
        return False

    def vector(self, e: A.Expr, before: int, allowed: tuple[Side, ...], what: str) -> Node:
        if self._mentions_state(e, before):
            raise SpecError(
                f"the state is used inside {what}: a state-dependent gate is not supported",
                e.span,
                hint="gates must not depend on the state (the update must be linear in it); " + SUPPORTED,
            )
        if self.is_matrix(e, before):
            raise SpecError(
                f"{what} must be a per-token vector or scalar, not a matrix", e.span, hint=SUPPORTED
            )
        n = self.number(e, Ctx.STATE, before, what)
        side = side_of(n)
        if side is None:
            raise SpecError(
                f"{what} mixes key-side (q, k, d) and value-side (v, e) elements",
                e.span,
                hint="a vector runs over d (key side) or over e (value side), not both",
            )
        if side not in allowed:
            want = " or ".join(s.value for s in allowed)
            raise SpecError(
                f"{what} must be a {want} vector here, got a {side.value}", e.span, hint=SUPPORTED
            )
        return n

    def mat(self, e: A.Expr, before: int) -> Mat:
        """Lower a matrix-valued expression."""
        span = e.span
        let = self._let_of(e, before)
        if let is not None:
            self.used_lets.add(e.id)  # type: ignore[attr-defined]
            return self.mat(let, before)
        if isinstance(e, A.Name):
            if e.id == self.state:
                return Mat(MatOp.STATE, MatKind.STATE, span=span)
            if self._is_identity(e.id):
                return Mat(MatOp.IDENTITY, MatKind.KEY, span=span)
        if isinstance(e, A.Call) and e.func in _MATRIX_FUNCS:
            if len(e.args) != _MATRIX_FUNCS[e.func]:
                raise SpecError(
                    f"{e.func}() takes {_MATRIX_FUNCS[e.func]} argument(s), got {len(e.args)}", span
                )
            if e.func == "diag":
                x = self.vector(e.args[0], before, (Side.KEY, Side.SCALAR), "the argument of diag()")
                return Mat(MatOp.DIAG, MatKind.KEY, leaves=(x,), span=span)
            x = self.vector(e.args[0], before, (Side.KEY, Side.VALUE), "the first argument of outer()")
            y = self.vector(e.args[1], before, (Side.KEY,), "the second argument of outer() (the key side)")
            kind = MatKind.STATE if side_of(x) is Side.VALUE else MatKind.KEY
            return Mat(MatOp.OUTER, kind, leaves=(x, y), span=span)
        if isinstance(e, A.Unary) and e.op in "+-":
            m = self.mat(e.operand, before)
            return m if e.op == "+" else Mat(MatOp.NEG, m.kind, (m,), span=span)
        if isinstance(e, A.Binary) and e.op in ("@", "+", "-", "*", "/"):
            lm, rm = self.is_matrix(e.left, before), self.is_matrix(e.right, before)
            if e.op == "@":
                if not (lm and rm):
                    raise SpecError(
                        "'@' multiplies two matrices here (the read is written 'read = S @ x')",
                        span,
                        hint="use diag(x) for an element-wise (diagonal) factor; " + SUPPORTED,
                    )
                a, b = self.mat(e.left, before), self.mat(e.right, before)
                if b.kind is not MatKind.KEY:
                    raise SpecError(
                        f"the right factor of '@' must be a [D, D] transition, got an {b.kind.value} matrix",
                        e.right.span,
                        hint="the state is multiplied from the right: S @ T acts on the key side; "
                        + SUPPORTED,
                    )
                return Mat(MatOp.MATMUL, a.kind, (a, b), span=span)
            if e.op in "+-":
                if not (lm and rm):
                    other = e.right if lm else e.left
                    raise SpecError(
                        f"cannot {'add' if e.op == '+' else 'subtract'} a matrix and a scalar",
                        other.span,
                        hint="write the scalar as a multiple of the identity, e.g. c * I",
                    )
                a, b = self.mat(e.left, before), self.mat(e.right, before)
                if a.kind is not b.kind:
                    raise SpecError(
                        f"cannot {'add' if e.op == '+' else 'subtract'} an {a.kind.value} and an "
                        f"{b.kind.value} matrix",
                        span,
                        hint="the state and writes outer(v', k') are [E, D]; transitions (I, diag, "
                        "outer(a, b)) are [D, D] and multiply the state: S @ T; " + SUPPORTED,
                    )
                return Mat(MatOp.ADD if e.op == "+" else MatOp.SUB, a.kind, (a, b), span=span)
            if lm and rm:
                raise SpecError(
                    f"'{e.op}' between two matrices is element-wise; matrices multiply with '@'",
                    span,
                    hint=SUPPORTED,
                )
            if e.op == "/" and rm:
                raise SpecError("cannot divide by a matrix", e.right.span, hint=SUPPORTED)
            m_expr, c_expr = (e.left, e.right) if lm else (e.right, e.left)
            m = self.mat(m_expr, before)
            c = self.vector(c_expr, before, (Side.SCALAR,), "a matrix's scale factor")
            if e.op == "/":
                c = bld.binary(Op.DIV, const(1.0), c)
            return Mat(MatOp.SCALE, m.kind, (m,), (c,), span=span)
        if isinstance(e, A.Call | A.Index | A.Unary | A.Binary) and self.is_matrix(e, before):
            holds_state = self._mentions_state(e, before)
            raise SpecError(
                "the state is used inside a function or an element-wise operation: a state-dependent gate "
                "is not supported"
                if holds_state
                else "a matrix cannot be an argument of an element-wise operation",
                span,
                hint=SUPPORTED,
            )
        raise SpecError(
            "expected a matrix expression (S, I, diag(x), outer(x, y) and '@', '+', '-', scalings)",
            span,
            hint=SUPPORTED,
        )

    def _mentions_state(self, e: A.Expr, before: int) -> bool:
        stack = [e]
        while stack:
            x = stack.pop()
            if isinstance(x, A.Name) and x.id == self.state:
                return True
            let = self._let_of(x, before)
            if let is not None:
                stack.append(let)
            stack.extend(x.children())
        return False

    def read(self, st: A.ReadStmt, before: int) -> Read:
        """`read = S @ x`, optionally scaled: c * (S @ x), (S @ x) * c, (S @ x) / c."""
        e = st.value
        coef = const(1.0)
        while True:
            let = self._let_of(e, before)
            if let is not None:
                e = let
                continue
            if isinstance(e, A.Binary) and e.op in "*/" and e.op != "@":
                lm = self.is_matrix(e.left, before)
                inner, other = (e.left, e.right) if lm else (e.right, e.left)
                if e.op == "/" and not lm:
                    break
                c = self.vector(other, before, (Side.SCALAR,), "the read's scale factor")
                coef = bld.binary(Op.MUL, coef, c if e.op == "*" else bld.binary(Op.DIV, const(1.0), c))
                e = inner
                continue
            break
        if not (
            isinstance(e, A.Binary) and e.op == "@" and isinstance(e.left, A.Name) and e.left.id == self.state
        ):
            raise SpecError(
                f"the read must be {self.state} @ x (x a key-side vector such as q), optionally scaled",
                st.value.span,
                hint=f"e.g. read = {self.state} @ q * D ** -0.5",
            )
        x = self.vector(e.right, before, (Side.KEY,), "the read vector")
        return Read(coef, x, st.value.span)


def lower_recurrence(att: A.Attention, scope: Scope) -> Recurrence:
    from .ir import ScalarParam, TensorParam

    st, rd = _check_state_body(att)
    low = _StateLowerer(att, scope, st.name)
    if st.name in scope.tensors or st.name in scope.scalars or st.name in scope.sizes:
        raise SpecError(f"the state '{st.name}' shadows a parameter or size symbol", st.name_span)
    q, k = scope.tensors["q"].shape, scope.tensors["k"].shape
    if q[2] != k[2]:
        raise SpecError(
            "a state block reads q and k at the same token: q and k must share the length dimension",
            k[2].span,
            hint="write the same size symbol for both lengths, e.g. q: [B, H, N, D], k: [B, H, N, D]",
        )
    # The ordinary lowering of the declarations (params, layout, lets), without its statement pass.
    low.layout = None

    low.layout = Layout(
        batch=low.dim(q[0]),
        heads=low.dim(q[1]),
        kv_heads=low.dim(k[1]),
        q_len=low.dim(q[2]),
        kv_len=low.dim(k[2]),
        head_dim=low.dim(q[3]),
        v_dim=low.dim(scope.tensors["v"].shape[3]),
    )
    params: list[TensorParam | ScalarParam] = []
    for p in att.params:
        if isinstance(p, A.TensorParam):
            params.append(
                TensorParam(p.name, scope.roles[p.name], low.aux_shape(p), scope.tensor_types[p.name])
            )
        else:
            default = None
            if p.default is not None:
                default = low.expr(p.default, Ctx.DEFAULT, 0)
                if p.type == "float":
                    default = bld.to_float(default)
            params.append(ScalarParam(p.name, DType.INT if p.type == "int" else DType.FLOAT, default))
    from .lower import _register_lets

    _register_lets(low, att)
    pos = {id(s): n for n, s in enumerate(att.body)}
    update = low.mat(st.value, pos[id(st)])
    if update.kind is not MatKind.STATE:
        raise SpecError(
            f"the update of '{st.name}' is a [D, D] matrix; it must be the new [E, D] state",
            st.value.span,
            hint=f"e.g. state {st.name} = {st.name} @ T + outer(v, k)",
        )
    read = low.read(rd, pos[id(rd)])
    rec = Recurrence(att.name, tuple(params), low.layout, st.name, update, read, st.value.span)
    verify(rec)
    analyse(rec)  # outside the supported structure: a SpecError now, at check time (the result is cached)
    return rec


BLOCK_KINDS.append((is_state_block, lower_recurrence))


__all__ = ["SUPPORTED", "Span", "is_state_block", "lower_recurrence"]
