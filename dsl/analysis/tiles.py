"""Compile-time block sparsity of a mask: which key tiles each query tile must visit, and which tiles are full.

A kernel walks the score matrix in tiles: query tile [m0, m0 + BM) x key tile [n0, n0 + BN), both clipped to
[0, M) x [0, N). From the mask's IR, `plan_tiles` derives with sympy, once per spec, symbolic expressions in
m0, BM (resp. n0, BN), the size symbols and the runtime scalars:

- `kv_intervals`: at most three key intervals [lo, hi) per query tile whose union contains every key j that is
  visible from some query of the tile. Key tiles outside them are never loaded.
- `q_intervals`: the transpose, for the dK/dV kernel (which walks query tiles for a fixed key tile).
- `full`: a condition that, when true, guarantees every in-range pair of the tile is visible, so the kernel
  may skip the mask arithmetic there. Only boundary tiles evaluate the mask.

Everything is *sound*: the intervals are supersets and `full` is a sufficient condition. Where the analysis
cannot decide, it falls back to visiting the whole range [0, N) with the mask applied, never to skipping.

How. The mask is turned into a formula of and/or over atoms `d < 0` or `d <= 0`, d a sympy expression
(negations pushed to the comparisons; min, max, abs and where removed by distributing or case splitting;
`a == b` is `a - b <= 0 and b - a <= 0`). Then, for a query tile whose rows are i in [i_lo, i_hi]:

- an atom's key set {j : some i in the tile has d(i, j) <= 0} is found by writing d = A(i) + B(j)
  (terms mixing i and j, e.g. floor((i - j) / C), are first replaced by a lower bound such as
  floor(u) >= u - 1, which only enlarges the set), bounding min A over the tile by interval arithmetic, and
  solving B(j) <= -min A for j: exactly when B is c*j or e*floor(linear(j)), else after relaxing B too;
- `and` intersects the interval lists, `or` concatenates them (merging same-start or same-end intervals, and
  taking hulls when more than three remain);
- an atom is true on the whole tile when the upper bound of d over the tile's rectangle (interval arithmetic,
  exact for affine d and monotone floor terms) is below 0; `full(and) = and(full)`, `full(or) = or(full)`.

Int scalars used as divisors (`i // C`) are assumed positive while solving (sympy then knows the signs);
the results are guarded by `C > 0` and fall back to the whole range otherwise. A comparison that reads a
tensor (`doc[b, i] == doc[b, j]`) is unknown: it neither restricts the intervals nor makes a tile full, so
`doc[b, i] == doc[b, j] and j <= i` still gets the causal bounds; `data_dependent` says that a runtime
pre-pass could skip more. The index variables b, h, hk are per-program constants and may appear in the plan.

`classify` evaluates the plan numerically for concrete sizes (what a kernel does); `dense_mask` is an
independent numpy evaluator of the mask IR, used as the oracle in tests and for `attnc show-mask`.
"""

from __future__ import annotations

import functools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np
import sympy as sp
from sympy.functions.elementary.piecewise import ExprCondPair

from ..ir import COMPARE_OPS, Attention, DType, Node, Op, ScalarParam, Var, linearize, walk
from .symbolic import symbol_for_scalar, symbol_for_size, symbol_for_var, to_sympy

SKIP, PARTIAL, FULL = 0, 1, 2
MAX_INTERVALS = 3
_MAX_ATOMS = 256  # beyond this the mask is not analysed (every tile is visited with the mask applied)

# Tile symbols. Dummies, so that they can never clash with a spec's size symbol or scalar named BM or m0.
TILE_M0 = sp.Dummy("m0", integer=True, nonnegative=True)  # first query row of the tile
TILE_BM = sp.Dummy("BM", integer=True, positive=True)  # query tile size
TILE_N0 = sp.Dummy("n0", integer=True, nonnegative=True)  # first key of the tile
TILE_BN = sp.Dummy("BN", integer=True, positive=True)  # key tile size
TILE_SYMBOLS = (TILE_M0, TILE_BM, TILE_N0, TILE_BN)

_I = symbol_for_var(Var.I)
_J = symbol_for_var(Var.J)

Interval = tuple[sp.Expr, sp.Expr]  # [lo, hi): hi <= lo means empty


class BindingError(ValueError):
    """Sizes or scalars given to `classify`/`dense_mask` do not fit the spec (unknown name, missing value...)."""


# ---- the plan -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TilePlan:
    name: str
    q_len: sp.Expr  # M, in size symbols
    kv_len: sp.Expr  # N
    kv_intervals: tuple[Interval, ...]  # keys a query tile [m0, m0 + BM) may see; within [0, N)
    q_intervals: tuple[Interval, ...]  # queries that may see a key tile [n0, n0 + BN); within [0, M)
    full: sp.Basic  # sympy bool in m0, BM, n0, BN, ...: true => every in-range pair of the tile is visible
    data_dependent: bool  # the mask reads tensors; a runtime pre-pass could skip more tiles
    notes: tuple[str, ...] = ()  # where the analysis was conservative, and what it assumed
    # Set when the planner gave up on the mask (too many comparisons, or over its work or time budget): every
    # tile is then visited with the mask applied. Says why; `attnc show-ir` prints it.
    fallback: str | None = None
    # Lean intervals: keys every row of a query tile [m0, m0 + BM) sees (and the transpose, queries every key
    # of a key tile [n0, n0 + BN) is seen by), valid when that tile lies wholly inside [0, M) (resp. [0, N)).
    # Subsets, never supersets: a kernel runs the tiles inside them, and inside [0, N), without bounds or mask
    # arithmetic. Empty where the analysis cannot prove a key visible (a data-dependent conjunct, a relaxation).
    kv_lean: tuple[Interval, ...] = ()
    q_lean: tuple[Interval, ...] = ()

    def free_symbols(self) -> set[sp.Symbol]:
        exprs: list[sp.Basic] = [self.full, self.q_len, self.kv_len]
        for lo, hi in self.kv_intervals + self.q_intervals + self.kv_lean + self.q_lean:
            exprs += [lo, hi]
        out: set[sp.Symbol] = set()
        for e in exprs:
            out |= e.free_symbols  # type: ignore[arg-type]
        return out - set(TILE_SYMBOLS)

    def describe(self) -> str:
        """Readable rendering with the tile symbols printed as m0, BM, n0, BN."""
        names = {s: sp.Symbol(s.name) for s in TILE_SYMBOLS}

        def show(e: sp.Basic) -> str:
            return str(e.xreplace(names))

        def ivs(v: tuple[Interval, ...]) -> str:
            return " U ".join(f"[{show(lo)}, {show(hi)})" for lo, hi in v) or "(none)"

        lines = [
            f"{self.name}: keys visited by query tile [m0, m0 + BM): {ivs(self.kv_intervals)}",
            f"{self.name}: queries visited by key tile [n0, n0 + BN): {ivs(self.q_intervals)}",
            f"{self.name}: tile fully visible when: {show(self.full)}",
            f"{self.name}: keys every row of a whole query tile sees (lean): {ivs(self.kv_lean)}",
            f"{self.name}: queries every key of a whole key tile is seen by (lean): {ivs(self.q_lean)}",
        ]
        if self.fallback is not None:
            lines.append(f"{self.name}: fallback: {self.fallback}")
        if self.data_dependent:
            lines.append(f"{self.name}: data-dependent mask (bounds use only the conjuncts without loads)")
        lines += [f"{self.name}: note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---- formulas -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Atom:  # d < 0 (strict) or d <= 0
    d: sp.Expr
    strict: bool


@dataclass(frozen=True)
class _And:
    parts: tuple[Formula, ...]


@dataclass(frozen=True)
class _Or:
    parts: tuple[Formula, ...]


@dataclass(frozen=True)
class _Const:  # a condition on sizes and scalars only
    value: sp.Basic


@dataclass(frozen=True)
class _Unknown:  # anything we do not analyse: may be true or false anywhere
    reason: str


Formula = _Atom | _And | _Or | _Const | _Unknown

_NEGATED = {Op.LT: Op.GE, Op.LE: Op.GT, Op.GT: Op.LE, Op.GE: Op.LT, Op.EQ: Op.NE, Op.NE: Op.EQ}


class _TooBig(Exception):
    pass


class _OverBudget(Exception):
    pass


# Planning is bounded twice: by a count of analysis steps (atoms made, formulas reached, inequalities solved),
# which keeps the generated code the same on a loaded and an idle machine, and, as a last resort against one
# slow sympy call, by wall-clock time. Past either, the mask falls back to visiting every tile, masked.
PLAN_STEP_BUDGET = 20_000
PLAN_TIME_BUDGET_S = 10.0


class _Budget:
    def __init__(self, steps: int, seconds: float) -> None:
        self.left = steps
        self.deadline = time.monotonic() + seconds
        self.steps = steps
        self.seconds = seconds

    def tick(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise _OverBudget(f"over the planner's budget of {self.steps} analysis steps")
        if time.monotonic() > self.deadline:
            raise _OverBudget(f"over the planner's time budget of {self.seconds:g} s")


class _FormulaBuilder:
    """IR mask -> formula over atoms. Negations are pushed down to the comparisons."""

    def __init__(self, att: Attention, budget: _Budget) -> None:
        self.notes: list[str] = []
        self.atoms = 0
        self.budget = budget
        # Int/float scalars used directly as divisors get a positive twin while solving (see module doc).
        self.twins: dict[sp.Symbol, sp.Symbol] = {}
        assert att.mask is not None
        for n in walk([att.mask]):
            if n.op in (Op.DIV, Op.FLOORDIV, Op.MOD) and n.args[1].op is Op.SCALAR:
                s = to_sympy(n.args[1])
                assert isinstance(s, sp.Symbol)
                kind = {"integer": True} if s.is_integer else {"real": True}
                self.twins[s] = sp.Dummy(s.name, positive=True, **kind)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def from_ir(self, n: Node, pos: bool = True) -> Formula:
        op = n.op
        if op is Op.CONST:
            return _Const(sp.true if bool(n.attr) == pos else sp.false)
        if op is Op.NOT:
            return self.from_ir(n.args[0], not pos)
        if op in (Op.AND, Op.OR):
            parts = tuple(self.from_ir(a, pos) for a in n.args)
            return _And(parts) if (op is Op.AND) == pos else _Or(parts)
        if op is Op.WHERE:
            # where(c, a, b) = (c and a) or (not c and b); not where(c, a, b) = where(c, not a, not b)
            c, a, b = n.args
            return _Or(
                (
                    _And((self.from_ir(c, True), self.from_ir(a, pos))),
                    _And((self.from_ir(c, False), self.from_ir(b, pos))),
                )
            )
        if op in (Op.EQ, Op.NE) and n.args[0].dtype is DType.BOOL:
            a, b = n.args
            if (op is Op.EQ) == pos:  # a == b: both true or both false
                return _Or(
                    (
                        _And((self.from_ir(a, True), self.from_ir(b, True))),
                        _And((self.from_ir(a, False), self.from_ir(b, False))),
                    )
                )
            return _Or(
                (
                    _And((self.from_ir(a, True), self.from_ir(b, False))),
                    _And((self.from_ir(a, False), self.from_ir(b, True))),
                )
            )
        if op in COMPARE_OPS:
            loads = sorted({str(x.attr) for x in walk(n.args) if x.op is Op.LOAD})
            if loads:
                self.note(f"conditions reading {', '.join(loads)} are data-dependent: not used for skipping")
                return _Unknown("reads " + ", ".join(loads))
            a, b = (to_sympy(x, _CHEAP_OPS, self.twins) for x in n.args)
            return self.compare(op if pos else _NEGATED[op], a, b)
        if op is Op.LOAD:
            self.note(f"bool tensor {n.attr} is data-dependent: not used for skipping")
            return _Unknown(f"reads {n.attr}")
        self.note(f"cannot analyse a bool {op.value}")  # pragma: no cover - every bool op is handled above
        return _Unknown(op.value)  # pragma: no cover

    def compare(self, op: Op, a: sp.Expr, b: sp.Expr) -> Formula:
        if op is Op.LE:
            return self.atom(a - b, False)
        if op is Op.LT:
            return self.atom(a - b, True)
        if op is Op.GE:
            return self.atom(b - a, False)
        if op is Op.GT:
            return self.atom(b - a, True)
        if op is Op.EQ:
            return _And((self.atom(a - b, False), self.atom(b - a, False)))
        return _Or((self.atom(a - b, True), self.atom(b - a, True)))  # NE

    def from_sympy_bool(self, c: sp.Basic, pos: bool) -> Formula:
        """Conditions of a Piecewise (from an int/float `where` inside a comparison)."""
        if c in (sp.true, sp.false):
            return _Const(sp.true if (c is sp.true) == pos else sp.false)
        if isinstance(c, sp.Not):
            return self.from_sympy_bool(c.args[0], not pos)
        if isinstance(c, sp.And | sp.Or):
            parts = tuple(self.from_sympy_bool(a, pos) for a in c.args)
            return _And(parts) if isinstance(c, sp.And) == pos else _Or(parts)
        ops = {sp.StrictLessThan: Op.LT, sp.LessThan: Op.LE, sp.StrictGreaterThan: Op.GT}
        ops |= {sp.GreaterThan: Op.GE, sp.Equality: Op.EQ, sp.Unequality: Op.NE}
        if type(c) in ops:
            op = ops[type(c)]
            return self.compare(op if pos else _NEGATED[op], c.lhs, c.rhs)
        self.note(f"cannot analyse the condition {c}")
        return _Unknown(str(c))

    def atom(self, d: sp.Expr, strict: bool) -> Formula:
        self.budget.tick()
        self.atoms += 1
        if self.atoms > _MAX_ATOMS:
            raise _TooBig
        d = _expand(d)
        if not d.has(_I, _J):  # a condition on sizes, scalars, b, h: the same for every pair
            return _Const(_rel(d, sp.Integer(0), strict))
        for p in d.atoms(sp.Pow):
            if p.exp.is_negative and not p.base.is_positive:
                self.note(f"division by {p.base}, whose sign is unknown: not used for skipping")
                return _Unknown(f"division by {p.base}")
        for m in d.atoms(sp.Mod):
            if not m.args[1].is_positive:
                self.note(f"modulo {m.args[1]}, whose sign is unknown: not used for skipping")
                return _Unknown(f"modulo {m.args[1]}")
        # Piecewise-linear terms at the top of d distribute exactly: with c > 0,
        # rest + c*max(a, b) <= 0  <=>  rest + c*a <= 0 and rest + c*b <= 0, and min gives `or`.
        for t in sp.Add.make_args(d):
            coef, f = t.as_independent(_I, _J, as_Add=False)
            if isinstance(f, sp.Min | sp.Max | sp.Abs) and coef.is_number and coef != 0:
                args = (f.args[0], -f.args[0]) if isinstance(f, sp.Abs) else f.args
                conj = isinstance(f, sp.Max | sp.Abs) == bool(coef > 0)
                rest = d - t
                parts = tuple(self.atom(rest + coef * a, strict) for a in args)
                return _And(parts) if conj else _Or(parts)
        # Nested ones (e.g. inside a floor, or with a symbolic coefficient): split into the cases.
        inner = [
            x for x in sp.preorder_traversal(d) if isinstance(x, sp.Min | sp.Max | sp.Abs | sp.Piecewise)
        ]
        if inner:
            f = inner[0]
            if isinstance(f, sp.Piecewise):
                return self.split_piecewise(d, f, strict)
            if isinstance(f, sp.Abs):
                x, rest_f = f.args[0], -f.args[0]
                first_wins = self.atom(-x, False)  # x >= 0: abs(x) = x
                other_wins = self.atom(x, True)
            else:
                x, rest_f = f.args[0], f.func(*f.args[1:])
                # max(x, r) = x when r <= x; min(x, r) = x when x <= r
                diff = rest_f - x if isinstance(f, sp.Max) else x - rest_f
                first_wins, other_wins = self.atom(diff, False), self.atom(-diff, True)
            return _Or(
                (
                    _And((first_wins, self.atom(d.xreplace({f: x}), strict))),
                    _And((other_wins, self.atom(d.xreplace({f: rest_f}), strict))),
                )
            )
        return _Atom(d, strict)

    def split_piecewise(self, d: sp.Expr, f: sp.Piecewise, strict: bool) -> Formula:
        cases: list[Formula] = []
        earlier: list[Formula] = []  # the conditions of earlier branches are false in later ones
        for value, cond in f.args:
            this = _And(
                (*earlier, self.from_sympy_bool(cond, True), self.atom(d.xreplace({f: value}), strict))
            )
            cases.append(this)
            earlier.append(self.from_sympy_bool(cond, False))
        return _Or(tuple(cases))


# Cheap constructors for the IR -> sympy conversion of masks (see `_decide`).
_CHEAP_OPS = {
    Op.MIN: lambda x, y: _min(x, y),
    Op.MAX: lambda x, y: _max(x, y),
    Op.FLOORDIV: lambda x, y: _round(sp.floor, x / y),
}


# ---- interval arithmetic over a tile ------------------------------------------------------------------------


# Sympy's automatic evaluation of Min, Max, Piecewise and relations over nested floor/mod/clamp terms is what
# made planning slow (minutes for 2-D dilated neighbourhoods: `Max.__new__` compares every pair of arguments
# with the assumption system). The plan only needs *values*, so these constructors decide a comparison when
# that is cheap (a numeric difference, or a difference of plain polynomial terms) and otherwise leave the
# expression unevaluated: the kernel computes it exactly at run time. The bound is the same either way.

_HEAVY = (sp.Min, sp.Max, sp.Piecewise, sp.floor, sp.ceiling, sp.Mod, sp.Abs)


def _decide(diff: sp.Expr, strict: bool) -> bool | None:
    """diff < 0 (strict) or diff <= 0 when cheaply decided, else None. A difference that is not real
    (`log(-B)`, NaN at run time: found by the fuzz run) is left undecided: the kernels evaluate it."""
    if diff.has(sp.zoo, sp.nan, sp.I):  # structural (cheap): no assumption queries on heavy terms
        return None
    if diff.is_Number:
        return bool(diff < 0) if strict else bool(diff <= 0)
    if diff.has(*_HEAVY) or sp.count_ops(diff) > 24:
        return None
    try:
        rel = sp.Lt(diff, 0) if strict else sp.Le(diff, 0)
    except TypeError:  # a comparison sympy proves non-real
        return None
    if rel is sp.true:
        return True
    if rel is sp.false:
        return False
    return None


def _rel(a: sp.Expr, b: sp.Expr, strict: bool) -> sp.Basic:
    """a < b (strict) or a <= b, folded to true/false when cheaply decided."""
    a, b = sp.sympify(a), sp.sympify(b)
    got = _decide(_expand(a - b) if not (a.has(*_HEAVY) or b.has(*_HEAVY)) else a - b, strict)
    if got is not None:
        return sp.true if got else sp.false
    return sp.Lt(a, b, evaluate=False) if strict else sp.Le(a, b, evaluate=False)


def _pw(*cases: tuple[sp.Basic, sp.Basic]) -> sp.Basic:
    """Piecewise without sympy's case collapsing: branches with a false condition are dropped, a true one ends
    the list."""
    out: list[tuple[sp.Basic, sp.Basic]] = []
    for value, cond in cases:
        if cond is sp.false:
            continue
        if cond is sp.true:
            if not out:
                return value
            out.append((value, sp.true))
            break
        out.append((value, cond))
    else:
        raise ValueError("Piecewise without a default")  # pragma: no cover - every caller ends with True
    if all(v == out[0][0] for v, _ in out):
        return out[0][0]
    # Built directly: Piecewise(..., evaluate=False) still folds every condition holding a Piecewise.
    pairs = (sp.Tuple.__new__(ExprCondPair, sp.sympify(v), c) for v, c in out)
    return sp.Basic.__new__(sp.Piecewise, *pairs)


def _round(func: type, e: sp.Expr) -> sp.Expr:
    """floor(e) or ceiling(e); unevaluated when e holds nested min/max/floor terms (see `_decide`)."""
    if not e.has(*_HEAVY):
        return func(e)
    return e if _int_valued(e) else func(e, evaluate=False)


def _int_valued(e: sp.Basic) -> bool:
    """A structural test that e takes integer values (sympy's `is_integer` asks the assumption system, which
    is slow on nested min/max/floor terms)."""
    if isinstance(e, sp.Integer):
        return True
    if isinstance(e, sp.Symbol):
        return bool(e.is_integer)
    if isinstance(e, sp.floor | sp.ceiling):
        return True
    if isinstance(e, sp.Add | sp.Mul | sp.Min | sp.Max | sp.Mod):
        return all(_int_valued(a) for a in e.args)
    if isinstance(e, sp.Piecewise):
        return all(_int_valued(v) for v, _ in e.args)
    if isinstance(e, sp.Pow):
        return _int_valued(e.base) and bool(e.exp.is_Integer) and e.exp >= 0
    return False


def _substitute_raw(e: sp.Basic, mapping: Mapping[sp.Basic, sp.Basic]) -> sp.Basic:
    """e with the keys of `mapping` replaced, rebuilding without evaluation (xreplace would re-run sympy's
    simplification of every Min/Max/Piecewise on the way up: the slow part)."""
    keys = set(mapping)
    memo: dict[sp.Basic, sp.Basic] = {}

    def go(x: sp.Basic) -> sp.Basic:
        if x in mapping:
            return mapping[x]
        if not x.args or not (x.free_symbols & keys):
            return x
        if x in memo:
            return memo[x]
        new = [go(a) for a in x.args]
        if isinstance(x, ExprCondPair):
            out: sp.Basic = sp.Tuple.__new__(ExprCondPair, *new)
        elif isinstance(x, sp.Piecewise):
            out = sp.Basic.__new__(sp.Piecewise, *new)
        elif isinstance(x, sp.And | sp.Or | sp.Not):
            out = x.func(*new)
        else:
            out = x.func(*new, evaluate=False)
        memo[x] = out
        return out

    return go(e)


def _expand(e: sp.Expr) -> sp.Expr:
    """sympy.expand, except inside min/max/abs/Piecewise, which stay as they are: expanding re-evaluates
    them (slow), and the planner only needs the top-level sum of terms and the insides of floor and mod."""
    heavy = [a for a in sp.preorder_traversal(e) if isinstance(a, sp.Min | sp.Max | sp.Abs | sp.Piecewise)]
    if not heavy:
        return sp.expand(e)
    stand_in = {}
    for k, a in enumerate(heavy):
        if a not in stand_in:
            stand_in[a] = sp.Dummy(f"h{k}", **({"integer": True} if _int_valued(a) else {"real": True}))
    with_names = e.xreplace(stand_in)
    return _substitute_raw(sp.expand(with_names), {v: k for k, v in stand_in.items()})


def _by_sign(c: sp.Expr, pos: sp.Expr, neg: sp.Expr, zero: sp.Expr | None = None) -> sp.Expr:
    """pos where c > 0, neg where c < 0 (and zero, if given, where c == 0)."""
    if c.is_positive:
        return pos
    if c.is_negative:
        return neg
    if zero is None:
        if c.is_nonnegative:
            return pos
        if c.is_nonpositive:
            return neg
        return _pw((pos, _rel(0, c, False)), (neg, sp.true))
    if c.is_zero:
        return zero
    return _pw((pos, _rel(0, c, True)), (neg, _rel(c, 0, True)), (zero, sp.true))


def _bounds(e: sp.Expr, box: Mapping[sp.Symbol, Interval]) -> Interval | None:
    """(lo, hi) with lo <= e <= hi whenever each box symbol s lies in [box[s][0], box[s][1]] (inclusive).
    Other symbols are fixed. None when e is not built from + and * by constants, floor, ceiling, mod by a
    positive constant, min, max and abs."""
    if not any(e.has(s) for s in box):
        return (e, e)
    if e in box:
        return box[e]  # type: ignore[index]
    if isinstance(e, sp.Add):
        parts = [_bounds(t, box) for t in e.args]
        if any(p is None for p in parts):
            return None
        return (sp.Add(*(p[0] for p in parts)), sp.Add(*(p[1] for p in parts)))  # type: ignore[index]
    if isinstance(e, sp.Mul):
        coef, rest = e.as_independent(*box, as_Add=False)
        if isinstance(rest, sp.Mul):  # a product of two varying factors: not handled
            return None
        b = _bounds(rest, box)
        if b is None:
            return None
        return (_by_sign(coef, coef * b[0], coef * b[1]), _by_sign(coef, coef * b[1], coef * b[0]))
    if isinstance(e, sp.floor | sp.ceiling):  # monotone
        b = _bounds(e.args[0], box)
        return None if b is None else (_round(e.func, b[0]), _round(e.func, b[1]))
    if isinstance(e, sp.Mod):
        a, c = e.args
        b = _bounds(a, box)
        if b is None or not c.is_positive or any(c.has(s) for s in box):
            return None
        # Exact when the whole range lies in one period [c*k, c*(k + 1)), else [0, c) in general.
        k = _round(sp.floor, b[0] / c)
        k1 = _round(sp.floor, b[1] / c)
        same = sp.true if k1 == k else sp.Eq(k1, k, evaluate=False)
        top = c - 1 if (a.is_integer and c.is_integer) else c
        return (
            _pw((b[0] - c * k, same), (sp.Integer(0), sp.true)),
            _pw((b[1] - c * k, same), (top, sp.true)),
        )
    if isinstance(e, sp.Min | sp.Max):
        parts = [_bounds(t, box) for t in e.args]
        if any(p is None for p in parts):
            return None
        fold = _max if isinstance(e, sp.Max) else _min
        return (fold(*(p[0] for p in parts)), fold(*(p[1] for p in parts)))  # type: ignore[index]
    if isinstance(e, sp.Abs):
        b = _bounds(e.args[0], box)
        if b is None:
            return None
        lo, hi = b
        return (
            _pw((lo, _rel(0, lo, False)), (-hi, _rel(hi, 0, False)), (sp.Integer(0), sp.true)),
            _max(-lo, hi),
        )
    return None


def _lower_term(t: sp.Expr, xs: tuple[sp.Symbol, ...]) -> sp.Expr | None:
    """A lower bound of one term coef * f(...) without floor/ceiling/mod of the variables xs:
    floor(u) > u - 1, ceiling(u) >= u, 0 <= mod(a, c) < c (c > 0). None if not possible."""
    coef, f = t.as_independent(*xs, as_Add=False)
    if not (coef.is_positive or coef.is_negative):
        return None
    if isinstance(f, sp.floor):
        lo, hi = f.args[0] - 1, f.args[0]
    elif isinstance(f, sp.ceiling):
        lo, hi = f.args[0], f.args[0] + 1
    elif isinstance(f, sp.Mod) and f.args[1].is_positive and not any(f.args[1].has(x) for x in xs):
        lo, hi = sp.Integer(0), f.args[1]
    else:
        return None
    return coef * lo if coef.is_positive else coef * hi


def _relax(e: sp.Expr, xs: tuple[sp.Symbol, ...], mixed_only: bool) -> sp.Expr | None:
    """Replace the terms of e that apply floor/ceiling/mod to xs (only those mixing all of xs, if
    mixed_only) by lower bounds, until none is left. e <= 0 then implies relaxed(e) <= 0."""
    for _ in range(8):
        changed = False
        terms = []
        for t in sp.Add.make_args(_expand(e)):
            needs = all(t.has(x) for x in xs) if mixed_only else any(t.has(x) for x in xs)
            if needs and t.has(sp.floor, sp.ceiling, sp.Mod):
                t2 = _lower_term(t, xs)
                if t2 is None:
                    return None
                t, changed = t2, True
            terms.append(t)
        e = _expand(sp.Add(*terms))
        if not changed:
            return e
    return None


# ---- key (or query) sets of formulas ------------------------------------------------------------------------


def _fold(func: type, args: tuple[sp.Expr, ...]) -> sp.Expr:
    """min or max of args: arguments that are cheaply decided to lose are dropped, duplicates removed, nested
    calls of the same kind flattened; what is left stays unevaluated (see `_decide`)."""
    flat: list[sp.Expr] = []
    for a in args:
        for x in a.args if isinstance(a, func) else (a,):
            if x not in flat:
                flat.append(x)
    keep: list[sp.Expr] = []
    for x in flat:
        beaten = False
        for k, y in enumerate(keep):
            # for max: x <= y means x loses; y <= x means y loses (for min the other way round)
            d = _expand(x - y) if not (x.has(*_HEAVY) or y.has(*_HEAVY)) else x - y
            diff = d if func is sp.Max else -d
            if _decide(diff, False):
                beaten = True
                break
            if _decide(-diff, False):
                keep[k] = x
                beaten = True
                break
        if not beaten:
            keep.append(x)
    keep = list(dict.fromkeys(keep))
    if len(keep) == 1:
        return keep[0]
    return func(*keep, evaluate=False)


def _max(*args: sp.Expr) -> sp.Expr:
    """max for an interval intersection or bound: folded when cheaply decided, otherwise left unevaluated (the
    kernel computes it exactly at run time)."""
    return _fold(sp.Max, args)


def _min(*args: sp.Expr) -> sp.Expr:
    """min: see `_max`."""
    return _fold(sp.Min, args)


@dataclass
class _Solver:
    """Solves for variable x (j: the keys of a query tile; or i, transposed), the other variable y ranging
    over the tile [y_lo, y_hi]; universe = [0, extent of x).

    By default `reach` returns a superset of {x : some y of the tile satisfies f}. With `exact`, it returns a
    subset of {x : every y of the tile satisfies f} instead (the lean intervals): each step that would
    enlarge a set (a relaxation, an unknown conjunct, a hull) gives up on the set, returning nothing."""

    x: sp.Symbol
    y: sp.Symbol
    ybox: Interval
    universe: Interval
    notes: list[str]
    # Bounds over the tile that are not plain polynomials (nested min/max/floor/mod) are solved against as
    # opaque symbols, substituted back (without evaluation) once the intervals are known: sympy then never
    # simplifies floor(Max(...)/c) and the like, which is where the time went.
    opaque: dict[sp.Basic, sp.Symbol]
    budget: _Budget
    exact: bool = False

    def when(self, cond: sp.Basic, ivs: list[Interval]) -> list[Interval]:
        if cond is sp.true:
            return ivs
        if cond is sp.false:
            return []
        lo0 = self.universe[0]
        return [(lo, _pw((hi, cond), (lo0, sp.true))) for lo, hi in ivs]

    def reach(self, f: Formula) -> list[Interval]:
        self.budget.tick()
        if isinstance(f, _Const):
            return self.when(f.value, [self.universe])
        if isinstance(f, _Unknown):
            return [] if self.exact else [self.universe]
        if isinstance(f, _Or):
            out: list[Interval] = []
            for p in f.parts:
                out += self.reach(p)
            return self.merge(out)
        if isinstance(f, _And):
            acc = [self.universe]
            for p in f.parts:
                other = self.reach(p)
                acc = self.merge([(_max(a[0], b[0]), _min(a[1], b[1])) for a in acc for b in other])
            return acc
        return self.reach_atom(f)

    def merge(self, ivs: list[Interval]) -> list[Interval]:
        """Drop provably empty intervals, merge intervals with the same start or end, then take hulls until at
        most MAX_INTERVALS remain (a hull is a superset: still sound)."""
        out: list[Interval] = []
        for lo, hi in ivs:
            if _rel(hi, lo, False) is sp.true:
                continue
            for k, (lo2, hi2) in enumerate(out):
                if lo == lo2:
                    out[k] = (lo, _max(hi, hi2))
                    break
                if hi == hi2:
                    out[k] = (_min(lo, lo2), hi)
                    break
            else:
                out.append((lo, hi))
        if any(iv == self.universe for iv in out):
            return [self.universe]
        if self.exact:  # a hull may hold points of neither interval: keep the first ones (still a subset)
            return out[:MAX_INTERVALS]
        while len(out) > MAX_INTERVALS:
            (a_lo, a_hi), (b_lo, b_hi) = out[-2], out[-1]
            out[-2:] = [(_min(a_lo, b_lo), _max(a_hi, b_hi))]
            self.note(f"more than {MAX_INTERVALS} intervals: hull taken")
        return out

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def reach_atom(self, f: _Atom) -> list[Interval]:
        """{x : some y of the tile has d(x, y) <= 0 (or < 0)}, as a superset; with `exact`, {x : every y of
        the tile has d(x, y) <= 0}, as a subset."""
        x, y = self.x, self.y
        if self.exact:
            d = _expand(f.d)
            a_terms, b_terms = [], []
            for t in sp.Add.make_args(d):
                if t.has(x) and t.has(y):  # floor((i - j) / C), i * j: no exact split into A(y) + B(x)
                    return []
                (b_terms if t.has(x) else a_terms).append(t)
            a_bounds = _bounds(sp.Add(*a_terms), {y: self.ybox})
            if a_bounds is None:
                return []
            # every y has A(y) + B(x) <= 0  <=>  B(x) <= -max A  (and -upper bound of A is stronger: a subset)
            return self.solve(sp.Add(*b_terms), self.name(-a_bounds[1]), f.strict)
        d = _relax(f.d, (x, y), mixed_only=True)  # floor((i - j) / C) -> (i - j) / C - 1, ...
        if d is None:
            self.note(f"cannot separate {f.d}: not used for skipping")
            return [self.universe]
        if d != _expand(f.d):
            self.note(f"relaxed a term mixing i and j in {f.d} <= 0")
        a_terms, b_terms = [], []
        for t in sp.Add.make_args(d):
            if t.has(x) and t.has(y):  # e.g. i * j
                self.note(f"cannot separate {f.d}: not used for skipping")
                return [self.universe]
            (b_terms if t.has(x) else a_terms).append(t)
        a_bounds = _bounds(sp.Add(*a_terms), {y: self.ybox})
        if a_bounds is None:
            self.note(f"cannot bound {sp.Add(*a_terms)} over a tile: not used for skipping")
            return [self.universe]
        # some y has A(y) + B(x) <= 0  <=>  B(x) <= -min A  (and -lower bound of A is weaker: still sound)
        return self.solve(sp.Add(*b_terms), self.name(-a_bounds[0]), f.strict)

    def name(self, r: sp.Expr) -> sp.Expr:
        """r itself when it is a plain polynomial, else the opaque symbol standing for it."""
        if not r.has(*_HEAVY):
            return r
        if r not in self.opaque:
            kind = {"integer": True} if _int_valued(r) else {"real": True}
            self.opaque[r] = sp.Dummy(f"t{len(self.opaque)}", **kind)
        return self.opaque[r]

    def solve(self, b: sp.Expr, r: sp.Expr, strict: bool) -> list[Interval]:
        """{x : b(x) <= r} (b(x) < r if strict), b without other varying symbols; a superset."""
        self.budget.tick()
        x = self.x
        if b == 0:
            return self.when(_rel(0, r, strict), [self.universe])
        c = b.coeff(x)
        if not c.has(x) and not _expand(b - c * x).has(x):
            return self.solve_linear(c, r - _expand(b - c * x), strict)
        coef, f = b.as_independent(x, as_Add=False)
        if isinstance(f, sp.floor) and (coef.is_positive or coef.is_negative):
            u = _expand(f.args[0])
            uc = u.coeff(x)
            if not uc.has(x) and not _expand(u - uc * x).has(x):
                # floor inverted exactly: for an integer n, floor(u) <= n <=> u < n + 1; floor(u) >= n <=> u >= n
                if coef.is_positive:  # coef * floor(u) <= r  <=>  floor(u) <= floor(r / coef)
                    n = sp.ceiling(r / coef) - 1 if strict else sp.floor(r / coef)
                    return self.solve(u, n + 1, True)
                n = sp.floor(r / coef) + 1 if strict else sp.ceiling(r / coef)  # floor(u) >= r / coef
                return self.solve(-u, -n, False)
        if self.exact:  # a relaxation enlarges the set
            return []
        relaxed = _relax(b, (x,), mixed_only=False)
        if relaxed is None or relaxed == b:
            self.note(f"cannot solve {b} <= r for {x}: not used for skipping")
            return [self.universe]
        self.note(f"relaxed {b} to {relaxed}")
        return self.solve(relaxed, r, strict)

    def solve_linear(self, c: sp.Expr, r: sp.Expr, strict: bool) -> list[Interval]:
        """{x : c * x <= r} (< if strict) for integer x."""
        lo_u, hi_u = self.universe
        if strict:  # c > 0: x < r / c <=> x <= ceil(r / c) - 1;  c < 0: x > r / c <=> x >= floor(r / c) + 1
            pos, neg = (lo_u, sp.ceiling(r / c)), (sp.floor(r / c) + 1, hi_u)
            zero_ok = _rel(0, r, True)
        else:  # c > 0: x <= floor(r / c);  c < 0: x >= ceil(r / c)
            pos, neg = (lo_u, sp.floor(r / c) + 1), (sp.ceiling(r / c), hi_u)
            zero_ok = _rel(0, r, False)
        if c.is_zero:
            return self.when(zero_ok, [self.universe])
        if c.is_positive:
            return [pos]
        if c.is_negative:
            return [neg]
        zero = (lo_u, _pw((hi_u, zero_ok), (lo_u, sp.true)))
        return [(_by_sign(c, pos[0], neg[0], zero[0]), _by_sign(c, pos[1], neg[1], zero[1]))]


def _full(f: Formula, box: Mapping[sp.Symbol, Interval], budget: _Budget) -> sp.Basic:
    """A sufficient condition for f to hold at every point of the box."""
    budget.tick()
    if isinstance(f, _Const):
        return f.value
    if isinstance(f, _Unknown):
        return sp.false
    if isinstance(f, _And):
        return sp.And(*(_full(p, box, budget) for p in f.parts))
    if isinstance(
        f, _Or
    ):  # sufficient, not necessary: a tile covered by two disjuncts together stays partial
        return sp.Or(*(_full(p, box, budget) for p in f.parts))
    b = _bounds(f.d, box)
    if b is None:
        return sp.false
    return _rel(b[1], sp.Integer(0), f.strict)


def _rename(e: sp.Basic, names: Mapping[sp.Symbol, sp.Symbol]) -> sp.Basic:
    """e with symbols renamed, without re-evaluating (xreplace would rebuild every Min/Max/Piecewise)."""
    if not names:
        return e
    return _substitute_raw(e, names)


# ---- entry point --------------------------------------------------------------------------------------------


_PLAN_CACHE: OrderedDict[tuple, TilePlan] = OrderedDict()
_PLAN_CACHE_SIZE = 256


def clear_plan_cache() -> None:
    """Forget memoised plans (benchmarks time planning cold)."""
    _PLAN_CACHE.clear()


def plan_tiles(att: Attention, *, budget_steps: int | None = None, budget_s: float | None = None) -> TilePlan:
    """The block-sparsity plan of `att.mask` (see the module docstring). Memoised on what the plan depends on
    (name, mask, lengths): the kernel writer, `attnc show-ir` and the blocks of one file sharing a mask plan
    once. The budgets default to PLAN_STEP_BUDGET and PLAN_TIME_BUDGET_S."""
    steps = PLAN_STEP_BUDGET if budget_steps is None else budget_steps
    seconds = PLAN_TIME_BUDGET_S if budget_s is None else budget_s
    key = (att.name, att.mask, att.layout.q_len, att.layout.kv_len, steps, seconds)
    if key in _PLAN_CACHE:
        _PLAN_CACHE.move_to_end(key)
        return _PLAN_CACHE[key]
    plan = _plan_tiles(att, _Budget(steps, seconds))
    _PLAN_CACHE[key] = plan
    if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.popitem(last=False)
    return plan


def _plan_tiles(att: Attention, budget: _Budget) -> TilePlan:
    m_len = to_sympy(att.layout.q_len)
    n_len = to_sympy(att.layout.kv_len)
    kv_universe: Interval = (sp.Integer(0), n_len)
    q_universe: Interval = (sp.Integer(0), m_len)
    if att.mask is None:
        return TilePlan(
            att.name,
            m_len,
            n_len,
            (kv_universe,),
            (q_universe,),
            sp.true,
            False,
            kv_lean=(kv_universe,),
            q_lean=(q_universe,),
        )

    data_dependent = any(n.op is Op.LOAD for n in walk([att.mask]))
    try:
        return _analyse(att, budget, m_len, n_len, data_dependent)
    except _TooBig:
        reason = f"mask too large to analyse (more than {_MAX_ATOMS} comparisons)"
    except _OverBudget as err:
        reason = f"mask {err}"
    except TypeError as err:
        # Sympy refuses to order a value it proves non-real (`0.5 < log(-B)`: NaN at run time, found by the
        # fuzz run). No tile can be proven skippable or full then; the kernels evaluate the mask as written.
        if "non-real" not in str(err):
            raise
        reason = "mask compares values that are not real for every size"
    why = f"{reason}: every tile is visited with the mask applied"
    return TilePlan(
        att.name, m_len, n_len, (kv_universe,), (q_universe,), sp.false, data_dependent, (why,), why
    )


def _analyse(
    att: Attention, budget: _Budget, m_len: sp.Expr, n_len: sp.Expr, data_dependent: bool
) -> TilePlan:
    assert att.mask is not None
    kv_universe: Interval = (sp.Integer(0), n_len)
    q_universe: Interval = (sp.Integer(0), m_len)
    builder = _FormulaBuilder(att, budget)
    formula = builder.from_ir(att.mask)

    # Rows of a query tile and keys of a key tile, clipped to the matrix (inclusive ends).
    ibox: Interval = (TILE_M0, sp.Min(TILE_M0 + TILE_BM, m_len) - 1)
    jbox: Interval = (TILE_N0, sp.Min(TILE_N0 + TILE_BN, n_len) - 1)
    notes = list(builder.notes)
    opaque: dict[sp.Basic, sp.Symbol] = {}
    kv = _Solver(_J, _I, ibox, kv_universe, notes, opaque, budget).reach(formula)
    q = _Solver(_I, _J, jbox, q_universe, notes, opaque, budget).reach(formula)
    # The lean intervals hold for a whole tile only (a kernel checks that the tile lies inside the matrix):
    # the rows are then exactly [m0, m0 + BM), unclipped, which keeps the bounds free of min(m0 + BM, M).
    whole_i: Interval = (TILE_M0, TILE_M0 + TILE_BM - 1)
    whole_j: Interval = (TILE_N0, TILE_N0 + TILE_BN - 1)
    kv_lean = _Solver(_J, _I, whole_i, kv_universe, notes, opaque, budget, exact=True).reach(formula)
    q_lean = _Solver(_I, _J, whole_j, q_universe, notes, opaque, budget, exact=True).reach(formula)
    definitions = {t: e for e, t in opaque.items()}
    full = _full(formula, {_I: ibox, _J: jbox}, budget)

    # Back from the positive twins to the scalars, guarded by their positivity.
    untwin = {t: s for s, t in builder.twins.items()}
    valid = sp.And(*(s > 0 for s in builder.twins))
    if builder.twins:
        notes.append(
            f"assumes {', '.join(f'{s} > 0' for s in builder.twins)} (else every tile is visited, masked)"
        )

    def finish(ivs: list[Interval], universe: Interval) -> tuple[Interval, ...]:
        if not ivs and valid is not sp.true:
            ivs = [(universe[0], universe[0])]  # empty under the assumptions, but the guard must stay
        out = []
        for lo, hi in ivs:
            lo = _max(_rename(_substitute_raw(lo, definitions), untwin), universe[0])
            hi = _min(_rename(_substitute_raw(hi, definitions), untwin), universe[1])
            if valid is not sp.true:
                lo = _pw((lo, valid), (universe[0], sp.true))
                hi = _pw((hi, valid), (universe[1], sp.true))
            out.append((lo, hi))
        return tuple(out)

    def finish_lean(ivs: list[Interval], universe: Interval) -> tuple[Interval, ...]:
        """As `finish`, but a subset: outside the twins' assumptions the intervals are empty."""
        out = []
        for lo, hi in ivs:
            lo = _max(_rename(_substitute_raw(lo, definitions), untwin), universe[0])
            hi = _min(_rename(_substitute_raw(hi, definitions), untwin), universe[1])
            if valid is not sp.true:
                hi = _pw((hi, valid), (universe[0], sp.true))
            if _rel(hi, lo, False) is not sp.true:
                out.append((lo, hi))
        return tuple(out)

    full = sp.And(valid, _rename(full, untwin))
    for twin, scalar in untwin.items():  # notes were written with the twins' names (_C): use the scalars'
        notes = [n.replace(str(twin), str(scalar)) for n in notes]
    return TilePlan(
        att.name,
        m_len,
        n_len,
        finish(kv, kv_universe),
        finish(q, q_universe),
        full,
        data_dependent,
        tuple(notes),
        kv_lean=finish_lean(kv_lean, kv_universe),
        q_lean=finish_lean(q_lean, q_universe),
    )


# ---- numeric evaluation -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bindings:
    """Concrete values for a spec: every size symbol and scalar the mask needs, plus M and N."""

    values: dict[sp.Symbol, int | float]
    sizes: dict[str, int]
    scalars: dict[str, int | float]
    M: int
    N: int


def bind(att: Attention, sizes: Mapping[str, int], scalars: Mapping[str, int | float]) -> Bindings:
    """Check names and fill scalar defaults. Raises BindingError with a readable message."""
    size_names = set()
    for p in att.tensors:
        for dim in p.shape:
            size_names |= {str(n.attr) for n in walk([dim]) if n.op is Op.SIZE}
    for name, v in sizes.items():
        if name not in size_names:
            known = ", ".join(sorted(size_names))
            raise BindingError(f"{att.name} has no size symbol '{name}' (its sizes: {known})")
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise BindingError(f"size {name} must be an integer >= 1, got {v!r}")
    scalar_params = {p.name: p for p in att.scalars}
    for name in scalars:
        if name not in scalar_params:
            known = ", ".join(sorted(scalar_params)) or "none"
            raise BindingError(f"{att.name} has no scalar parameter '{name}' (its scalars: {known})")
    values: dict[sp.Symbol, int | float] = {symbol_for_size(k): int(v) for k, v in sizes.items()}
    out_scalars: dict[str, int | float] = {}
    for name, p in scalar_params.items():
        value = _scalar_value(p, scalars.get(name), values)
        if value is None:
            continue  # no default, or one needing sizes not given: an error only if the mask needs it
        out_scalars[name] = value
        values[symbol_for_scalar(name, p.dtype is DType.INT)] = value
    for v in (Var.B, Var.H, Var.HK):  # the picture (and the tests) take batch 0, head 0
        values[symbol_for_var(v)] = 0
    m, n = (
        _int_value(att, e, values, what) for e, what in ((att.layout.q_len, "M"), (att.layout.kv_len, "N"))
    )
    return Bindings(values, {k: int(v) for k, v in sizes.items()}, out_scalars, m, n)


def _scalar_value(
    p: ScalarParam, given: int | float | None, values: Mapping[sp.Symbol, int | float]
) -> int | float | None:
    if given is None:
        if p.default is None:
            return None
        expr = _substitute(to_sympy(p.default), values)
        if expr.free_symbols:
            return None
        return int(expr) if p.dtype is DType.INT else float(expr)
    if p.dtype is DType.INT:
        if isinstance(given, bool) or not isinstance(given, int | np.integer):
            raise BindingError(f"scalar {p.name} is an int, got {given!r}")
        return int(given)
    if isinstance(given, bool) or not isinstance(given, int | float | np.number):
        raise BindingError(f"scalar {p.name} is a float, got {given!r}")
    return float(given)


def _missing_text(att: Attention, names: list[str]) -> str:
    scalars = {p.name for p in att.scalars}
    parts = []
    for name in names:
        if name in scalars:
            parts.append(f"scalar {name} has no value (give it, or the sizes its default needs)")
        else:
            parts.append(f"size {name} has no value")
    return "the mask needs values: " + "; ".join(parts)


def _substitute(e: sp.Basic, values: Mapping[sp.Symbol, int | float]) -> sp.Basic:
    return e.xreplace({k: sp.sympify(v) for k, v in values.items()})


def _int_value(att: Attention, e: Node, values: Mapping[sp.Symbol, int | float], what: str) -> int:
    expr = _substitute(to_sympy(e), values)
    if expr.free_symbols:
        raise BindingError(f"{what} of {att.name} is {expr}: give its size")
    return int(expr)


@dataclass(frozen=True)
class _Compiled:
    """A plan's expressions as Python functions (sympy.lambdify), compiled once per plan."""

    symbols: tuple[sp.Symbol, ...]  # sizes, scalars, b/h/hk the plan uses, after the tile symbols
    kv_bounds: Callable[..., list]  # (m0, BM, *symbols) -> [lo0, hi0, lo1, hi1, ...]
    q_bounds: Callable[..., list]  # (n0, BN, *symbols) -> ...
    full: Callable[..., bool]  # (m0, BM, n0, BN, *symbols) -> bool
    kv_lean: Callable[..., list]  # (m0, BM, *symbols) -> [lo0, hi0, ...], as kv_bounds
    q_lean: Callable[..., list]  # (n0, BN, *symbols) -> ...


# The plan's expressions evaluated by a tree of closures, one per node kind (no exec of generated text).
# sympy.lambdify was used before: its code printer queries assumptions over the nested Min/Max/floor
# expressions of a generic neighbourhood and took over a minute for one NATTEN plan (issue 15). Evaluation is
# exact: sympy Rationals become fractions.Fraction, so floor/ceiling of a tile bound never rounds.
_NARY: dict[type, Callable[[list], object]] = {
    sp.Add: sum,
    sp.Mul: math.prod,
    sp.Min: min,
    sp.Max: max,
    sp.And: all,
    sp.Or: any,
}
_BINARY: dict[type, Callable[[object, object], object]] = {
    sp.StrictLessThan: lambda a, b: a < b,
    sp.LessThan: lambda a, b: a <= b,
    sp.StrictGreaterThan: lambda a, b: a > b,
    sp.GreaterThan: lambda a, b: a >= b,
    sp.Equality: lambda a, b: a == b,
    sp.Unequality: lambda a, b: a != b,
    sp.Mod: lambda a, b: a % b,
}
_UNARY: dict[type, Callable[[object], object]] = {
    sp.floor: math.floor,
    sp.ceiling: math.ceil,
    sp.Abs: abs,
    sp.Not: lambda a: not a,
}


def _power(base: object, exp: object) -> object:
    if isinstance(exp, int) and exp < 0 and isinstance(base, int | Fraction):
        return Fraction(1, 1) / Fraction(base) ** -exp  # exact, as sympy's Pow of a Rational
    return base**exp


def _closure(e: sp.Basic, index: Mapping[sp.Symbol, int], memo: dict) -> Callable[[tuple], object]:
    """A function of the argument tuple that evaluates `e`; `index` maps each symbol to its position."""
    got = memo.get(e)
    if got is not None:
        return got
    if isinstance(e, sp.Symbol):
        pos = index[e]

        def fn(a: tuple, pos: int = pos) -> object:
            return a[pos]
    elif e.is_Integer:
        value: object = int(e)

        def fn(a: tuple, value: object = value) -> object:
            return value
    elif e.is_Rational:
        value = Fraction(int(e.p), int(e.q))

        def fn(a: tuple, value: object = value) -> object:
            return value
    elif e is sp.true or e is sp.false:
        value = bool(e)

        def fn(a: tuple, value: object = value) -> object:
            return value
    elif e.is_Float:
        value = float(e)

        def fn(a: tuple, value: object = value) -> object:
            return value
    elif isinstance(e, sp.Piecewise):
        pairs = [(_closure(x, index, memo), _closure(c, index, memo)) for x, c in e.args]

        def fn(a: tuple, pairs: list = pairs) -> object:
            for x, c in pairs:
                if c(a):
                    return x(a)
            raise ArithmeticError("no piece of a Piecewise holds")  # sympy's nan: treated as unknown
    elif isinstance(e, sp.Pow):
        base, exp = (_closure(x, index, memo) for x in e.args)

        def fn(a: tuple, base: Callable = base, exp: Callable = exp) -> object:
            return _power(base(a), exp(a))
    else:
        for table, arity in ((_NARY, None), (_BINARY, 2), (_UNARY, 1)):
            op = next((f for t, f in table.items() if isinstance(e, t)), None)
            if op is not None and (arity is None or len(e.args) == arity):
                break
        else:
            raise TypeError(f"tile plan expression of unsupported kind {type(e).__name__}: {e}")
        subs = [_closure(x, index, memo) for x in e.args]
        if arity is None:

            def fn(a: tuple, op: Callable = op, subs: list = subs) -> object:
                return op([f(a) for f in subs])
        elif arity == 2:
            x, y = subs

            def fn(a: tuple, op: Callable = op, x: Callable = x, y: Callable = y) -> object:
                return op(x(a), y(a))
        else:
            (x,) = subs

            def fn(a: tuple, op: Callable = op, x: Callable = x) -> object:
                return op(x(a))

    if e.args:  # a compound node: computed once per evaluation, however often the trees share it
        inner, slot = fn, len(memo)

        def fn(a: tuple, inner: Callable = inner, slot: int = slot) -> object:
            done = a[-1]  # the evaluation's cache (see _evaluator)
            if slot not in done:
                done[slot] = inner(a)
            return done[slot]

    memo[e] = fn
    return fn


def _evaluator(args: tuple[sp.Symbol, ...], exprs: list[sp.Basic] | sp.Basic) -> Callable:
    """`f(*values)`: `exprs` (a list, or one expression) at `args = values`, as lambdify's would be."""
    index = {s: i for i, s in enumerate(args)}
    memo: dict = {}
    # Each call evaluates over (*values, cache): the last slot holds the shared subexpressions' values.
    if isinstance(exprs, list):
        fns = [_closure(e, index, memo) for e in exprs]

        def many(*values: object) -> list:
            a = (*values, {})
            return [f(a) for f in fns]

        return many
    one = _closure(exprs, index, memo)
    return lambda *values: one((*values, {}))


@functools.lru_cache(maxsize=256)
def _compile(plan: TilePlan) -> _Compiled:
    syms = tuple(sorted(plan.free_symbols(), key=str))

    def fn(tile: tuple[sp.Symbol, ...], exprs: list[sp.Basic]) -> Callable:
        return _evaluator((*tile, *syms), exprs)

    return _Compiled(
        syms,
        fn(TILE_SYMBOLS[:2], [e for iv in plan.kv_intervals for e in iv]),
        fn(TILE_SYMBOLS[2:], [e for iv in plan.q_intervals for e in iv]),
        fn(TILE_SYMBOLS, plan.full),
        fn(TILE_SYMBOLS[:2], [e for iv in plan.kv_lean for e in iv]),
        fn(TILE_SYMBOLS[2:], [e for iv in plan.q_lean for e in iv]),
    )


def _bound_plan(
    att: Attention,
    plan: TilePlan,
    sizes: Mapping[str, int],
    scalars: Mapping[str, int | float],
    BM: int,
    BN: int,
    by: str,
) -> tuple[int, int, _Compiled, list[int | float]]:
    """(M, N, the compiled plan, the values of its symbols) for evaluating a plan on tiles BM x BN; raises
    BindingError (or ValueError for `by`) with what is wrong."""
    if BM < 1 or BN < 1:
        raise BindingError(f"tile sizes must be >= 1, got {BM}x{BN}")
    if by not in ("query", "key"):
        raise ValueError(f"by must be 'query' or 'key', got {by!r}")
    b = bind(att, sizes, scalars)
    c = _compile(plan)
    missing = sorted(str(s) for s in c.symbols if s not in b.values)
    if missing:
        raise BindingError(f"{att.name}: {_missing_text(att, missing)}")
    return b.M, b.N, c, [b.values[s] for s in c.symbols]


def classify(
    att: Attention,
    plan: TilePlan,
    sizes: Mapping[str, int],
    scalars: Mapping[str, int | float],
    BM: int,
    BN: int,
    *,
    by: Literal["query", "key"] = "query",
) -> np.ndarray:
    """int8 [ceil(M / BM), ceil(N / BN)]: SKIP, PARTIAL or FULL per tile, as a kernel would decide it from
    the plan: by="query" walks the key intervals of each query tile (forward, dQ); by="key" the query
    intervals of each key tile (dK/dV). FULL tiles are those visited for which `plan.full` holds."""
    m, n, c, vals = _bound_plan(att, plan, sizes, scalars, BM, BN, by)
    nq, nk = -(-m // BM), -(-n // BN)
    cls = np.zeros((nq, nk), dtype=np.int8)
    # Walk the tiles of one side; mark the tiles of the other side that its intervals touch.
    if by == "query":
        bounds_fn, size, count, other_size, other_len = c.kv_bounds, BM, nq, BN, n
    else:
        bounds_fn, size, count, other_size, other_len = c.q_bounds, BN, nk, BM, m
    for t in range(count):
        try:
            got = bounds_fn(t * size, size, *vals)
        except (
            ArithmeticError
        ):  # e.g. a float scalar divisor of 0.0 (the guard is not always evaluated first)
            got = [0, other_len]
        for k in range(0, len(got), 2):
            lo, hi = max(math.floor(got[k]), 0), min(math.ceil(got[k + 1]), other_len)
            if hi > lo:
                first, last = lo // other_size, -(-hi // other_size)
                if by == "query":
                    cls[t, first:last] = PARTIAL
                else:
                    cls[first:last, t] = PARTIAL
    for t, u in zip(*np.nonzero(cls), strict=True):
        try:
            full = bool(c.full(int(t) * BM, BM, int(u) * BN, BN, *vals))
        except ArithmeticError:
            full = False
        if full:
            cls[t, u] = FULL
    return cls


def lean_tiles(
    att: Attention,
    plan: TilePlan,
    sizes: Mapping[str, int],
    scalars: Mapping[str, int | float],
    BM: int,
    BN: int,
    *,
    by: Literal["query", "key"] = "query",
) -> np.ndarray:
    """bool [ceil(M / BM), ceil(N / BN)]: the tiles a kernel runs lean (no bounds, no mask) by the plan's
    lean intervals. By query: for a query tile wholly inside [0, M), the key tiles lying wholly inside one of
    its lean key intervals and inside [0, N); by key, the transpose. (The kernel also keeps to the visited
    intervals: it never runs a tile that `classify` skips.)"""
    m, n, c, vals = _bound_plan(att, plan, sizes, scalars, BM, BN, by)
    out = np.zeros((-(-m // BM), -(-n // BN)), dtype=bool)
    if by == "query":
        fn, size, extent, other, other_len = c.kv_lean, BM, m, BN, n
    else:
        fn, size, extent, other, other_len = c.q_lean, BN, n, BM, m
    for t in range(extent // size):  # whole tiles only
        try:
            got = fn(t * size, size, *vals)
        except ArithmeticError:
            continue
        for k in range(0, len(got), 2):
            lo = -(-math.ceil(got[k]) // other) * other
            hi = min(math.floor(got[k + 1]), other_len) // other * other
            for u in range(max(lo, 0) // other, max(hi, 0) // other):
                if by == "query":
                    out[t, u] = True
                else:
                    out[u, t] = True
    return out


def visited_fraction(classes: np.ndarray) -> float:
    """Fraction of tiles a kernel loads (PARTIAL or FULL)."""
    return float(np.count_nonzero(classes != SKIP)) / max(classes.size, 1)


# ---- the oracle: a dense numpy evaluation of the mask --------------------------------------------------------

_UNARY_NP: dict[Op, Callable[[np.ndarray], np.ndarray]] = {
    Op.NEG: np.negative,
    Op.ABS: np.abs,
    Op.EXP: np.exp,
    Op.EXP2: np.exp2,
    Op.LOG: np.log,
    Op.LOG2: np.log2,
    Op.SQRT: np.sqrt,
    Op.RSQRT: lambda x: 1.0 / np.sqrt(x),
    Op.TANH: np.tanh,
    Op.SIGMOID: lambda x: 1.0 / (1.0 + np.exp(-x)),
    Op.RELU: lambda x: np.maximum(x, 0),
    Op.ELU: lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
    Op.TO_FLOAT: lambda x: np.asarray(x, dtype=np.float64),
}
_BINARY_NP: dict[Op, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    Op.ADD: np.add,
    Op.SUB: np.subtract,
    Op.MUL: np.multiply,
    Op.DIV: lambda a, b: np.true_divide(np.asarray(a, np.float64), b),
    Op.FLOORDIV: np.floor_divide,  # floor semantics, like Python
    Op.MOD: np.mod,  # the sign of the divisor, like Python
    Op.POW: lambda a, b: np.power(np.asarray(a, np.float64), b),
    Op.MIN: np.minimum,
    Op.MAX: np.maximum,
    Op.LT: np.less,
    Op.LE: np.less_equal,
    Op.GT: np.greater,
    Op.GE: np.greater_equal,
    Op.EQ: np.equal,
    Op.NE: np.not_equal,
}


def mask_bounds(
    att: Attention,
    sizes: Mapping[str, int],
    scalars: Mapping[str, int | float],
    aux: Mapping[str, np.ndarray] | None = None,
    rows: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(may, must), bool [rows, N]: the mask where it is known. With every tensor it reads given in `aux`,
    may == must == the mask. A comparison reading a missing tensor is unknown (may true, must false), and
    unknowns propagate through not/and/or (Kleene logic): `must` is what is visible whatever the data, `may`
    what could be. b = h = hk = 0. Evaluated node by node over broadcast i, j grids."""
    b = bind(att, sizes, scalars)
    r0, r1 = rows if rows is not None else (0, b.M)
    shape = (r1 - r0, b.N)
    if att.mask is None:
        return np.ones(shape, bool), np.ones(shape, bool)
    grid = {
        Var.I: np.arange(r0, r1, dtype=np.int64)[:, None],
        Var.J: np.arange(b.N, dtype=np.int64)[None, :],
        Var.B: np.int64(0),
        Var.H: np.int64(0),
        Var.HK: np.int64(0),
    }
    aux = aux or {}
    # Values: numbers are arrays or None (unknown: depends on a tensor not given); bools are (may, must).
    val: dict[Node, object] = {}
    with np.errstate(all="ignore"):  # integer division by zero is outside the contract (docs §7)
        for node in linearize([att.mask]):
            a = [val[x] for x in node.args]
            op = node.op
            r: object
            if op is Op.CONST:
                r = (np.bool_(node.attr),) * 2 if node.dtype is DType.BOOL else np.asarray(node.attr)
            elif op is Op.VAR:
                r = grid[node.attr]  # type: ignore[index]
            elif op is Op.SIZE:
                s = symbol_for_size(str(node.attr))
                if s not in b.values:
                    raise BindingError(f"{att.name}: the mask uses size {node.attr}; give its value")
                r = np.asarray(b.values[s])
            elif op is Op.SCALAR:
                if str(node.attr) not in b.scalars:
                    raise BindingError(f"{att.name}: {_missing_text(att, [str(node.attr)])}")
                r = np.asarray(b.scalars[str(node.attr)])
            elif op is Op.LOAD:
                r = _load(node, a, aux)
                if node.dtype is DType.BOOL:
                    r = (np.True_, np.False_) if r is None else (r, r)
            elif op is Op.NOT:
                may, must = a[0]  # type: ignore[misc]
                r = (~must, ~may)
            elif op in (Op.AND, Op.OR) or (op in (Op.EQ, Op.NE) and node.args[0].dtype is DType.BOOL):
                r = _bool_op(op, a[0], a[1])  # type: ignore[arg-type]
            elif op is Op.WHERE and node.dtype is DType.BOOL:
                (cm, cs), (am, as_), (bm, bs) = a  # type: ignore[misc]
                r = ((cm & am) | (~cs & bm), (cs & as_) | (~cm & bs) | (as_ & bs))
            elif op is Op.WHERE:
                (cm, cs), x, y = a  # type: ignore[misc]
                known = np.all(cm == cs)
                r = None if (x is None or y is None or not known) else np.where(cs, x, y)
            elif any(x is None for x in a):
                r = (np.True_, np.False_) if node.dtype is DType.BOOL else None
            elif op in (Op.FLOOR, Op.CEIL):
                x = np.asarray(a[0])
                if x.dtype.kind == "f":
                    x = (np.floor if op is Op.FLOOR else np.ceil)(x).astype(np.int64)
                r = x
            elif op in _UNARY_NP:
                r = _UNARY_NP[op](a[0])  # type: ignore[arg-type]
            elif op in _BINARY_NP:
                r = _BINARY_NP[op](a[0], a[1])  # type: ignore[arg-type]
                if node.dtype is DType.BOOL:
                    r = (r, r)
            else:  # pragma: no cover - dot(q, k) and elements never reach a mask
                raise ValueError(f"cannot evaluate {op.value} in a mask")
            val[node] = r
    may, must = val[att.mask]  # type: ignore[misc]
    return np.broadcast_to(may, shape).copy(), np.broadcast_to(must, shape).copy()


def _bool_op(op: Op, x: tuple, y: tuple) -> tuple:
    (xm, xs), (ym, ys) = x, y
    if op is Op.AND:
        return (xm & ym, xs & ys)
    if op is Op.OR:
        return (xm | ym, xs | ys)
    eq = ((xm & ym) | (~xs & ~ys), (xs & ys) | (~xm & ~ym))  # may / must be equal
    return eq if op is Op.EQ else (~eq[1], ~eq[0])


def _load(node: Node, idx: list, aux: Mapping[str, np.ndarray]) -> np.ndarray | None:
    name = str(node.attr)
    if name not in aux:
        return None
    if any(x is None for x in idx):
        return None
    t = np.asarray(aux[name])
    if t.ndim != len(idx):
        raise BindingError(f"{name}: expected {len(idx)} dimensions, got shape {list(t.shape)}")
    arrays = np.broadcast_arrays(*(np.asarray(x, dtype=np.int64) for x in idx))
    for k, (ix, dim) in enumerate(zip(arrays, t.shape, strict=True)):
        if ix.size and (ix.min() < 0 or ix.max() >= dim):
            raise BindingError(
                f"{name}: index {k} takes values in [{ix.min()}, {ix.max()}] where the mask reads it, "
                f"outside the dimension's range [0, {dim - 1}]"
            )
    return t[tuple(arrays)]


def dense_mask(
    att: Attention,
    sizes: Mapping[str, int],
    scalars: Mapping[str, int | float],
    aux: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """The mask as a bool [M, N] array (b = h = hk = 0), Python floor semantics for // and %. Every tensor the
    mask reads must be in `aux` (else BindingError)."""
    if att.mask is not None:
        missing = sorted({str(n.attr) for n in walk([att.mask]) if n.op is Op.LOAD} - set(aux or {}))
        if missing:
            raise BindingError(f"{att.name}: the mask reads {', '.join(missing)}; pass it in aux")
    may, _must = mask_bounds(att, sizes, scalars, aux)
    return may
