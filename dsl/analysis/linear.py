"""Does a `norm = none | sum` spec have a linear-time form?

A score is *separable* when, under the mask, it factors as

    score(i, j) = φ(q_i)·ψ(k_j) · a(i) · c(j) · exp(G(i) − G(j))

(Katharopoulos et al. 2020 for the feature maps; RetNet, Sun et al. 2023, eq. 1–6, and Lightning Attention-2,
Qin et al. 2024, section 3, for the positional decay). Then the row sums Σ_j score(i, j)·v_j are prefix sums
of the outer products ψ(k_j)·c(j)·exp(−G(j))·v_jᵀ, carried as a D×E state across chunks: O(N) instead of O(N²).

The analysis flattens the score into multiplicative factors. One factor must be `dot(q, k)` itself; the
others must each depend on at most one of i and j — except exponentials (`exp`, `exp2`, `base ** x` with a
position-free base), whose exponents are expanded into additive terms that must each depend on at most one of
i and j. The exponent's j-terms Q(j) define G = −Q; its i-terms P(i) and the leftover exp(P(i) + Q(i)) become
a(i), so the identity exp(P(i) + Q(j)) = exp(P(i) + Q(i)) · exp(G(i) − G(j)) holds exactly. sympy proves that
the split reproduces the exponent, and decides whether exp(P(i) + Q(i)) is position-free (it is for decays,
where it is 1).

The mask must be absent (bidirectional) or exactly `j <= i` (causal, q and k of one length). A position term
without a causal mask grows without bound on one side, so bidirectional specs must be position-free.
"""

from __future__ import annotations

import dataclasses
import math

import sympy as sp

from .. import builder as bld
from ..ir import Attention, Node, NormKind, Op, Var, const, format_expr, uses_var, var
from ..passes import rewrite
from .symbolic import symbol_for_var, to_sympy

_MAX_TERMS = 64


@dataclasses.dataclass(frozen=True)
class LinearForm:
    """score(i, j) = (φ(q_i)·q_scale(i)) · (ψ(k_j)·k_scale(j)) · exp(G(i) − G(j)) on j <= i (or everywhere)."""

    causal: bool
    q_scale: Node | None  # float; uses at most b, h, hk, i
    k_scale: Node | None  # float; uses at most b, h, hk, j
    log_decay: Node | None  # G, written in j (and b, h, hk); None: no positional factor
    k_per_query_head: bool  # k_scale reads the query head h: k~ is then computed per query head


@dataclasses.dataclass(frozen=True)
class LinearDecision:
    """`form` when the spec has a linear-time form; otherwise `reason` says why not (for show-ir/codegen)."""

    form: LinearForm | None
    reason: str

    @property
    def summary(self) -> str:
        if self.form is None:
            return f"quadratic (no linear form: {self.reason})"
        f = self.form
        parts = ["causal" if f.causal else "bidirectional"]
        if f.log_decay is not None:
            parts.append(f"decay exp(G(i) - G(j)), G(j) = {format_expr(f.log_decay)}")
        if f.q_scale is not None:
            parts.append(f"q scale {format_expr(f.q_scale)}")
        if f.k_scale is not None:
            parts.append(f"k scale {format_expr(f.k_scale)}")
        return "linear (chunk | recurrent | parallel): " + ", ".join(parts)


class _Refuse(Exception):
    pass


def _side(n: Node) -> tuple[bool, bool]:
    return uses_var(n, Var.I), uses_var(n, Var.J)


def _uses_dot(n: Node) -> bool:
    from ..ir import walk

    return any(x.op is Op.DOT for x in walk([n]))


def _factors(n: Node, out: list[tuple[Node, int]], power: int = 1) -> None:
    """Flatten products and quotients into (factor, ±1) pairs; a negation becomes the factor −1."""
    if n.op is Op.MUL:
        _factors(n.args[0], out, power)
        _factors(n.args[1], out, power)
    elif n.op is Op.DIV:
        _factors(n.args[0], out, power)
        _factors(n.args[1], out, -power)
    elif n.op is Op.NEG:
        out.append((const(-1.0), 1))
        _factors(n.args[0], out, power)
    elif n.op is Op.TO_FLOAT and n.args[0].op in (Op.MUL, Op.NEG):
        _factors(n.args[0], out, power)
    else:
        out.append((n, power))


def _terms(n: Node) -> list[Node]:
    """Additive terms of n, distributing products over sums (bounded); signs are folded into the terms."""
    if n.op is Op.ADD:
        return _terms(n.args[0]) + _terms(n.args[1])
    if n.op is Op.SUB:
        return _terms(n.args[0]) + [bld.unary(Op.NEG, t) for t in _terms(n.args[1])]
    if n.op is Op.NEG:
        return [bld.unary(Op.NEG, t) for t in _terms(n.args[0])]
    if n.op is Op.TO_FLOAT:
        return [bld.to_float(t) for t in _terms(n.args[0])]
    if n.op is Op.MUL:
        a, b = _terms(n.args[0]), _terms(n.args[1])
        if len(a) * len(b) <= _MAX_TERMS:
            return [bld.binary(Op.MUL, x, y) for x in a for y in b]
    if n.op is Op.DIV:
        b = n.args[1]
        if not any(_side(b)):
            return [bld.binary(Op.DIV, t, b) for t in _terms(n.args[0])]
    return [n]


def _sum(terms: list[Node]) -> Node:
    out: Node | None = None
    for t in terms:
        t = bld.to_float(t)
        out = t if out is None else bld.binary(Op.ADD, out, t)
    return const(0.0) if out is None else out


def _product(factors: list[Node]) -> Node | None:
    out: Node | None = None
    for f in factors:
        f = bld.to_float(f)
        out = f if out is None else bld.binary(Op.MUL, out, f)
    return out


def subst(n: Node, mapping: dict[Var, Node]) -> Node:
    """n with index variables replaced (e.g. j -> i)."""
    return rewrite(n, lambda m: mapping.get(m.attr) if m.op is Op.VAR else None)  # type: ignore[arg-type]


def _exponent(f: Node) -> Node | None:
    """The natural-log exponent of an exponential factor, or None."""
    if f.op is Op.EXP:
        return f.args[0]
    if f.op is Op.EXP2:
        return bld.binary(Op.MUL, f.args[0], const(math.log(2.0)))
    if f.op is Op.POW and not any(_side(f.args[0])):
        return bld.binary(Op.MUL, f.args[1], bld.unary(Op.LOG, f.args[0]))
    return None


def _is_causal(mask: Node) -> bool:
    return mask.op is Op.LE and mask.args[0] == var(Var.J) and mask.args[1] == var(Var.I)


def linear_form(att: Attention) -> LinearDecision | None:
    """None for norms outside the linear family; otherwise the decision with its reason."""
    if att.norm.kind not in (NormKind.NONE, NormKind.SUM):
        return None
    try:
        return LinearDecision(_analyse(att), "")
    except _Refuse as err:
        return LinearDecision(None, str(err))


def _analyse(att: Attention) -> LinearForm:
    lay = att.layout
    if lay.q_len != lay.kv_len:
        raise _Refuse("q and k have different lengths (M != N)")
    if att.mask is None:
        causal = False
    elif _is_causal(att.mask):
        causal = True
    else:
        raise _Refuse(f"the mask `{format_expr(att.mask)}` is neither absent nor `j <= i`")
    pairs: list[tuple[Node, int]] = []
    _factors(att.score, pairs)
    dots = [f for f, _ in pairs if _uses_dot(f)]
    if len(dots) != 1 or dots[0].op is not Op.DOT or next(p for f, p in pairs if f is dots[0]) != 1:
        raise _Refuse("the score is not dot(q, k) times factors free of dot(q, k)")
    q_side: list[Node] = []
    k_side: list[Node] = []
    exponent: list[Node] = []
    for f, power in pairs:
        if f.op is Op.DOT:
            continue
        uses_i, uses_j = _side(f)
        if not (uses_i or uses_j):  # uniform, or per batch/head: scales the query side
            q_side.append(f if power > 0 else bld.binary(Op.DIV, const(1.0), f))
            continue
        expo = _exponent(f)
        if expo is not None:
            exponent += [t if power > 0 else bld.unary(Op.NEG, t) for t in _terms(expo)]
            continue
        if uses_i and uses_j:
            raise _Refuse(f"the factor `{format_expr(f)}` depends on both i and j")
        if power < 0:
            f = bld.binary(Op.DIV, const(1.0), f)
        (k_side if uses_j else q_side).append(f)
    p_terms, q_terms = [], []
    for t in exponent:
        uses_i, uses_j = _side(t)
        if uses_i and uses_j:
            raise _Refuse(f"the exponent term `{format_expr(t)}` depends on both i and j")
        (q_terms if uses_j else p_terms).append(t)
    log_decay = None
    if q_terms:
        if not causal:
            raise _Refuse("a positional factor exp(G(i) - G(j)) needs the causal mask `j <= i`")
        total = _sum(exponent)
        p, q = _sum(p_terms), _sum(q_terms)
        # Proof that the split reproduces the exponent exactly.
        if (
            sp.simplify(to_sympy(total) - to_sympy(p) - to_sympy(q)) != 0
        ):  # pragma: no cover - by construction
            raise _Refuse("could not prove the exponent split")
        log_decay = bld.unary(Op.NEG, q)
        leftover = bld.binary(Op.ADD, p, subst(q, {Var.J: var(Var.I)}))
        rest = sp.simplify(to_sympy(leftover))
        if rest != 0:  # decays leave nothing: exp(P(i) + Q(i)) = 1
            if not rest.has(symbol_for_var(Var.I)):
                leftover = subst(leftover, {Var.I: const(0)})
            q_side.append(bld.unary(Op.EXP, leftover))
    elif p_terms:
        q_side.append(bld.unary(Op.EXP, _sum(p_terms)))
    k_scale = _product(k_side)
    uses_h = k_scale is not None and uses_var(k_scale, Var.H)
    return LinearForm(causal, _product(q_side), k_scale, log_decay, uses_h)


__all__ = ["LinearDecision", "LinearForm", "linear_form", "subst"]
