"""Does a state block's update have the structure the runtime computes, and with which inputs? (sympy)

The runtime (`attnc.runtime.delta`) computes, per (batch, head) and token t,

    S_t = S_{t-1} (Diag(w_t) + a_t b_tᵀ) + v'_t k'_tᵀ,    w_t = exp(g_t),    o_t = S_t q'_t.

`analyse` expands the update's matrix expression symbolically into that normal form: every element-wise
leaf becomes a sympy expression (a vector is a function of the symbol `d` or `e`), products of diagonal and
rank-1 factors are multiplied out (Diag(x) a bᵀ = (x ⊙ a) bᵀ, a bᵀ Diag(x) = a (b ⊙ x)ᵀ), and rank-1 terms
that share a factor up to a per-token scalar (sympy decides: the ratio does not depend on d) are merged.
What remains must be S @ (Diag(w) + at most one a bᵀ) plus exactly one write outer(v', k'), with w, a, b
free of the state and of q. The plan then says which runtime entry computes it: the delta rule
(T = Diag(w)(I − β k' k'ᵀ) with a write β v'' k'ᵀ: chunked for scalar w) or the general DPLR recurrence.

Anything else is a `SpecError` at the update (file:line:col, caret) whose hint states what is supported.
"""

from __future__ import annotations

import enum
import functools
import itertools
from dataclasses import dataclass

import sympy

from .. import builder as bld
from ..errors import Span, SpecError
from ..ir import DType, Node, Op, const, uses
from ..state_ir import SUPPORTED, Mat, MatKind, MatOp, Recurrence, Side, side_of

_D, _E = sympy.Symbol("d"), sympy.Symbol("e")


class GateShape(enum.Enum):
    NONE = "none"  # w = 1: no g
    SCALAR = "scalar"  # one log-gate per token: g [B, H, T]
    CHANNEL = "channel"  # per key channel: g [B, H, T, D]


class PlanKind(enum.Enum):
    DELTA = "delta"  # delta_rule(q', k', v'', beta, g): T = Diag(w)(I - beta k' k'ᵀ), write beta v'' k'ᵀ
    DPLR = "dplr"  # dplr(q', k', v', a, b, g): the general diagonal-plus-rank-1 transition


@dataclass(frozen=True)
class DeltaPlan:
    """The runtime inputs of a state block, each an element-wise IR expression (context b, h, hk, i and d
    for key-side vectors, e for value-side ones; q, k, v are `ELEM` nodes for the token's rows)."""

    kind: PlanKind
    gate: GateShape
    q: Node  # q' (the read's coefficient folded in), key side
    k: Node  # k', key side
    v: Node  # v' (DPLR) or v'' (DELTA: the write is beta v'' k'ᵀ), value side
    g: Node | None  # log w, scalar or key side
    beta: Node | None = None  # DELTA only, scalar
    a: Node | None = None  # DPLR only, key side
    b: Node | None = None


# ---- IR <-> sympy ---------------------------------------------------------------------------------------


class _Sym:
    """IR leaves as sympy: arithmetic, exp and log are translated; any other sub-expression (a load, q, a
    sigmoid, ...) is an opaque atom: a function of d (key side), of e (value side) or a plain symbol."""

    def __init__(self) -> None:
        self.atoms: dict[Node, sympy.Expr] = {}
        self.back: dict[sympy.Expr, Node] = {}
        self.sizes: dict[str, sympy.Symbol] = {}

    def atom(self, n: Node) -> sympy.Expr:
        if n not in self.atoms:
            name = f"x{len(self.atoms)}"
            side = side_of(n)
            s = (
                sympy.Function(name)(_D)
                if side is Side.KEY
                else sympy.Function(name)(_E)
                if side is Side.VALUE
                else sympy.Symbol(name)
            )
            self.atoms[n] = s
            self.back[s] = n
        return self.atoms[n]

    def to_sympy(self, n: Node) -> sympy.Expr:
        op, a = n.op, n.args
        if op is Op.CONST and n.dtype is not DType.BOOL:
            return sympy.Integer(n.attr) if isinstance(n.attr, int) else sympy.Float(n.attr)  # type: ignore[arg-type]
        if op is Op.TO_FLOAT:
            return self.to_sympy(a[0])
        table = {
            Op.ADD: lambda x, y: x + y,
            Op.SUB: lambda x, y: x - y,
            Op.MUL: lambda x, y: x * y,
            Op.DIV: lambda x, y: x / y,
            Op.POW: lambda x, y: x**y,
            Op.NEG: lambda x: -x,
            Op.EXP: sympy.exp,
            Op.LOG: sympy.log,
        }
        if op in table and all(x.dtype is not DType.BOOL for x in a):
            return table[op](*(self.to_sympy(x) for x in a))
        return self.atom(n)

    def to_ir(self, s: sympy.Expr) -> Node:
        if s in self.back:
            return self.back[s]
        if s.is_Integer:
            return const(int(s))
        if s.is_Number:
            return const(float(s))
        if s.is_Add:
            out = None
            for t in s.as_ordered_terms():
                neg = t.could_extract_minus_sign()
                x = self.to_ir(-t if neg else t)
                out = (
                    (bld.unary(Op.NEG, x) if neg else x)
                    if out is None
                    else bld.binary(Op.SUB if neg else Op.ADD, out, x)
                )
            assert out is not None
            return out
        if s.is_Mul:
            num, den, negate = [], [], False
            for f in s.as_ordered_factors():
                if f.is_Number and abs(float(f)) == 1.0:  # unit factors (a read without a scale, a -1)
                    negate ^= float(f) < 0
                    continue
                if f.is_Pow and f.exp.is_Number and f.exp < 0:
                    den.append(f.base ** (-f.exp))
                else:
                    num.append(f)
            top = const(1.0) if not num else self.to_ir(num[0])
            for f in num[1:]:
                top = bld.binary(Op.MUL, top, self.to_ir(f))
            for f in den:
                top = bld.binary(Op.DIV, top, self.to_ir(f))
            return bld.unary(Op.NEG, top) if negate else top
        if s.is_Pow:
            base = self.to_ir(s.base)
            if s.exp == -1:
                return bld.binary(Op.DIV, const(1.0), base)
            return bld.binary(Op.POW, base, self.to_ir(s.exp))
        if isinstance(s, sympy.exp):
            return bld.unary(Op.EXP, self.to_ir(s.args[0]))
        if isinstance(s, sympy.log):
            return bld.unary(Op.LOG, self.to_ir(s.args[0]))
        raise AssertionError(f"no IR for {s}")  # pragma: no cover - only the forms built above occur


# ---- the normal form ------------------------------------------------------------------------------------


@dataclass
class _Dplr:
    """A [D, D] matrix Diag(w) + Σ a bᵀ (w may be 0)."""

    w: sympy.Expr
    r1: list[tuple[sympy.Expr, sympy.Expr]]


@dataclass
class _Affine:
    """An [E, D] matrix S T + Σ x yᵀ (T None: the state does not occur)."""

    t: _Dplr | None
    writes: list[tuple[sympy.Expr, sympy.Expr]]


def _fail(msg: str, span: Span | None, hint: str = SUPPORTED) -> SpecError:
    return SpecError(msg, span, hint=hint)


def _free_of_channel(r: sympy.Expr) -> bool:
    return not r.has(_D) and not r.has(_E)


def _ratio(x: sympy.Expr, y: sympy.Expr) -> sympy.Expr | None:
    """x / y when it is a per-token scalar (does not vary along d or e), else None."""
    if y == 0:
        return None
    r = sympy.simplify(x / y)
    return r if _free_of_channel(r) else None


def _merge(terms: list[tuple[sympy.Expr, sympy.Expr]]) -> list[tuple[sympy.Expr, sympy.Expr]]:
    """Merge rank-1 terms sharing a factor up to a scalar: a1 bᵀ + a2 (r b)ᵀ = (a1 + r a2) bᵀ, and alike."""
    out = [t for t in terms if t[0] != 0 and t[1] != 0]
    changed = True
    while changed and len(out) > 1:
        changed = False
        for (i, (a1, b1)), (j, (a2, b2)) in itertools.combinations(enumerate(out), 2):
            r = _ratio(b2, b1)
            if r is not None:
                merged = (sympy.expand(a1 + r * a2), b1)
            else:
                r = _ratio(a2, a1)
                if r is None:
                    continue
                merged = (a1, sympy.expand(b1 + r * b2))
            out = [t for n, t in enumerate(out) if n not in (i, j)]
            if merged[0] != 0 and merged[1] != 0:
                out.append(merged)
            changed = True
            break
    return out


class _Expander:
    def __init__(self, sym: _Sym) -> None:
        self.sym = sym

    def key(self, m: Mat) -> _Dplr:
        op, s = m.op, self.sym
        if op is MatOp.IDENTITY:
            return _Dplr(sympy.Integer(1), [])
        if op is MatOp.DIAG:
            return _Dplr(s.to_sympy(m.leaves[0]), [])
        if op is MatOp.OUTER:
            return _Dplr(sympy.Integer(0), [(s.to_sympy(m.leaves[0]), s.to_sympy(m.leaves[1]))])
        if op is MatOp.SCALE:
            c = s.to_sympy(m.leaves[0])
            x = self.key(m.args[0])
            return _Dplr(c * x.w, [(c * a, b) for a, b in x.r1])
        if op is MatOp.NEG:
            x = self.key(m.args[0])
            return _Dplr(-x.w, [(-a, b) for a, b in x.r1])
        if op in (MatOp.ADD, MatOp.SUB):
            x, y = self.key(m.args[0]), self.key(m.args[1])
            sign = 1 if op is MatOp.ADD else -1
            return _Dplr(x.w + sign * y.w, x.r1 + [(sign * a, b) for a, b in y.r1])
        if op is MatOp.MATMUL:
            x, y = self.key(m.args[0]), self.key(m.args[1])
            if x.r1 and y.r1:
                raise _fail(
                    "a product of two rank-1 factors is not supported (it needs a dot product over the "
                    "channels inside the transition)",
                    m.span,
                )
            r1 = [(a, b * y.w) for a, b in x.r1] + [(x.w * a, b) for a, b in y.r1]
            return _Dplr(x.w * y.w, r1)
        raise AssertionError(op)  # pragma: no cover

    def state(self, m: Mat) -> _Affine:
        op, s = m.op, self.sym
        if op is MatOp.STATE:
            return _Affine(_Dplr(sympy.Integer(1), []), [])
        if op is MatOp.OUTER:
            return _Affine(None, [(s.to_sympy(m.leaves[0]), s.to_sympy(m.leaves[1]))])
        if op is MatOp.SCALE:
            c = s.to_sympy(m.leaves[0])
            x = self.state(m.args[0])
            t = None if x.t is None else _Dplr(c * x.t.w, [(c * a, b) for a, b in x.t.r1])
            return _Affine(t, [(c * a, b) for a, b in x.writes])
        if op is MatOp.NEG:
            x = self.state(m.args[0])
            t = None if x.t is None else _Dplr(-x.t.w, [(-a, b) for a, b in x.t.r1])
            return _Affine(t, [(-a, b) for a, b in x.writes])
        if op in (MatOp.ADD, MatOp.SUB):
            x, y = self.state(m.args[0]), self.state(m.args[1])
            sign = 1 if op is MatOp.ADD else -1
            ty = None if y.t is None else _Dplr(sign * y.t.w, [(sign * a, b) for a, b in y.t.r1])
            if x.t is None:
                t = ty
            elif ty is None:
                t = x.t
            else:
                t = _Dplr(x.t.w + ty.w, x.t.r1 + ty.r1)
            return _Affine(t, x.writes + [(sign * a, b) for a, b in y.writes])
        if op is MatOp.MATMUL:
            x, y = self.state(m.args[0]), self.key(m.args[1])
            if x.writes and y.r1:
                raise _fail(
                    "a write multiplied by a rank-1 transition is not supported",
                    m.span,
                    hint="add the write after the transition: S @ T + outer(v', k'); " + SUPPORTED,
                )
            t = None
            if x.t is not None:
                xt = x.t
                if xt.r1 and y.r1:
                    raise _fail(
                        "the transition is a product of two rank-1 factors, which is not supported",
                        m.span,
                    )
                t = _Dplr(xt.w * y.w, [(a, b * y.w) for a, b in xt.r1] + [(xt.w * a, b) for a, b in y.r1])
            return _Affine(t, [(a, b * y.w) for a, b in x.writes])
        raise AssertionError(op)  # pragma: no cover


def _span_reading_q(m: Mat) -> Span | None:
    """Where the transition reads q: the first [D, D] factor whose per-token leaves use q."""
    stack = [m]
    while stack:
        x = stack.pop()
        if x.kind is MatKind.KEY and any(
            uses(n, lambda u: u.op is Op.ELEM and u.attr == "q") for n in x.leaves
        ):
            return x.span
        stack.extend(reversed(x.args))
    return None


def _reads_q(sym: _Sym, *exprs: sympy.Expr) -> bool:
    for e in exprs:
        for atom, node in sym.back.items():
            if e.has(atom) and uses(node, lambda n: n.op is Op.ELEM and n.attr == "q"):
                return True
    return False


@functools.lru_cache(maxsize=64)  # checked at lowering, used again by the code generator
def analyse(rec: Recurrence) -> DeltaPlan:
    """The runtime plan of a state block, or a SpecError saying why its update is outside the structure."""
    sym = _Sym()
    span = rec.update_span
    form = _Expander(sym).state(rec.update)
    if form.t is None:
        raise _fail(
            f"the update of '{rec.state}' does not contain the state",
            span,
            hint=f"e.g. {rec.state} @ T + outer(v, k)",
        )
    w = sympy.simplify(form.t.w)
    if w.has(_E):
        raise _fail(
            "the transition's diagonal varies along e (value side)", span
        )  # pragma: no cover - typed away
    r1 = _merge([(sympy.expand(a), sympy.expand(b)) for a, b in form.t.r1])
    if len(r1) > 1:
        raise _fail(
            f"the transition is not diagonal plus rank 1: it has {len(r1)} rank-1 terms that do not share "
            "a factor (a non-DPLR transition)",
            span,
        )
    writes = _merge([(sympy.expand(a), sympy.expand(b)) for a, b in form.writes])
    if not writes:
        raise _fail(f"the update of '{rec.state}' has no write outer(v', k')", span)
    if len(writes) > 1:
        raise _fail(
            f"the write is not rank 1: {len(writes)} outer products that do not share a factor",
            span,
            hint="one write outer(v', k') per token is supported; " + SUPPORTED,
        )
    if w == 0:
        raise _fail(
            "the transition has no diagonal part (w = 0)",
            span,
            hint="the transition is Diag(w) + a bᵀ with w ≠ 0",
        )
    if _reads_q(sym, w, *(x for t in r1 for x in t)):
        raise _fail(
            "the transition reads q",
            _span_reading_q(rec.update) or span,
            hint="q enters only through the read (read = S @ q'); gates and transitions use k, v and "
            "auxiliary tensors; " + SUPPORTED,
        )
    vp, kp = writes[0]
    qp = sympy.expand(sym.to_sympy(rec.read.coef) * sym.to_sympy(rec.read.vector))
    gate = GateShape.NONE if w == 1 else GateShape.CHANNEL if w.has(_D) else GateShape.SCALAR
    g_sym = None if w == 1 else sympy.expand_log(sympy.log(w), force=True)
    g = None if g_sym is None else bld.to_float(sym.to_ir(g_sym))
    ir = sym.to_ir
    if r1:
        a, b = r1[0]
        # The delta rule: a = c1 w k', b = c2 k' (so T = Diag(w)(I − β k' k'ᵀ) with β = −c1 c2), and the write
        # β v'' k'ᵀ with v'' = v'/β free of division by a per-token quantity (β may be 0 at some tokens).
        c1, c2 = _ratio(a, w * kp), _ratio(b, kp)
        if c1 is not None and c2 is not None:
            beta = sympy.simplify(-c1 * c2)
            vpp = sympy.cancel(vp / beta) if beta != 0 else None
            if vpp is not None and not sympy.denom(sympy.together(vpp)).free_symbols - _uniform_symbols(sym):
                return DeltaPlan(
                    PlanKind.DELTA, gate, ir(qp), ir(kp), ir(vpp), g, beta=bld.to_float(ir(beta))
                )
        return DeltaPlan(PlanKind.DPLR, gate, ir(qp), ir(kp), ir(vp), g, a=ir(a), b=ir(b))
    return DeltaPlan(PlanKind.DPLR, gate, ir(qp), ir(kp), ir(vp), g)


def format_plan(rec: Recurrence) -> str:
    """`attnc show-ir` for a state block: the runtime call and each of its per-token inputs."""
    from ..ir import format_expr

    plan = analyse(rec)
    call = "delta_rule" if plan.kind is PlanKind.DELTA else "dplr"
    lines = [
        f"state block {rec.name}: S [E, D] per (b, h); runs attnc.runtime.delta.{call} (gate: {plan.gate.value})"
    ]
    for field_name in ("q", "k", "v", "beta", "g", "a", "b"):
        node = getattr(plan, field_name)
        if node is not None:
            lines.append(f"  {field_name}' = {format_expr(node)}")
    return "\n".join(lines)


def _uniform_symbols(sym: _Sym) -> set[sympy.Symbol]:
    """The symbols that stand for sizes, scalars and constants (a denominator of these is safe)."""
    from ..ir import is_uniform

    return {s for s, n in sym.back.items() if isinstance(s, sympy.Symbol) and is_uniform(n)}


__all__ = ["DeltaPlan", "GateShape", "MatKind", "PlanKind", "analyse"]
