"""Declaration checks: parameter names, q/k/v shapes, size symbols, dtypes, statement structure.

Produces a `Scope`: everything a name can refer to in the body. Expression typing happens while lowering
(`dsl.lower`), where each IR node is built by `dsl.builder`.
"""

from __future__ import annotations

import builtins
import keyword
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from . import ast as A
from .errors import Span, SpecError, did_you_mean
from .ir import DType, Role, TensorType, Var

INDEX_VARS = {v.value: v for v in Var}
FUNCTIONS = {
    "dot": 2,
    "where": 3,
    "exp": 1,
    "exp2": 1,
    "log": 1,
    "log2": 1,
    "sqrt": 1,
    "rsqrt": 1,
    "tanh": 1,
    "sigmoid": 1,
    "relu": 1,
    "elu": 1,
    "abs": 1,
    "floor": 1,
    "ceil": 1,
    "min": -2,  # two or more
    "max": -2,
    "clamp": 3,
}
KEYWORDS = {
    "attention",
    "let",
    "score",
    "mask",
    "norm",
    "output",
    "feature",
    "state",
    "read",
    "and",
    "or",
    "not",
    "true",
    "false",
}
NORMS = {"softmax": ("sink",), "sigmoid": ("bias",), "none": (), "sum": ("eps",)}
TENSOR_TYPES = {t.value: t for t in TensorType}
# Names the generated Python uses for itself; a parameter may not shadow them.
GENERATED_NAMES = {
    "torch",
    "math",
    "checkpoint",
    "annotations",
    "NamedTuple",
    "qk",
    "o",
    "lse",
    "sizes",
    "spec",
    "backend",
    "return_lse",
    # keyword arguments and locals of the generated entry points and their custom-op callbacks
    "algorithm",
    "initial_state",
    "return_state",
    "position_offset",  # the linear forms' shard arguments (context parallelism)
    "initial_log_decay",
    "return_log_decay",
    "block_layout",
    "cu_seqlens",  # the packed (varlen) entry points
    "max_seqlen",
    "cu_seqlens_q",
    "cu_seqlens_k",
    "max_seqlen_q",
    "max_seqlen_k",
    "block_table",  # the paged-KV-cache entry points
    "seq_lens",
    "linear",
    "ctx",
    "inputs",
    "do",
    "dlse",
}
_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")

# Parameters per attention block. Every parameter is an argument of the block's torch.library custom op, whose
# schema takes at most 64 arguments in this PyTorch (c10's dispatcher keeps one bit per argument in a 64-bit
# set); the op adds its own (the block layout, the backend, and in backward the output gradients). 48 leaves
# room for those, with a clear error at check time instead of a RuntimeError when the module is imported.
MAX_PARAMS = 48


@dataclass(frozen=True)
class GeneratedNames:
    """Names one generated namespace (a module file) defines at module level: `fixed` ones, whatever the spec,
    and `per_block` templates (`"{name}_reference"`, `"_{name}_op"`) instantiated for every attention block.
    A block whose names meet another block's or a fixed one would silently replace it."""

    fixed: frozenset[str] = frozenset()
    per_block: frozenset[str] = frozenset()

    def block_names(self, block: str) -> set[str]:
        return {t.format(name=block) for t in self.per_block}


# What the language itself promises (docs/language.md §3): NAME and NAME_reference per block.
LANGUAGE_NAMES = GeneratedNames(per_block=frozenset({"{name}", "{name}_reference"}))

# The hook through which a code generator declares what it emits, so that the front end reserves exactly
# that: each provider returns one GeneratedNames per namespace (file) it writes. A generator registers its
# provider when imported; `compile_to_ir(..., generated=...)` can also pass them explicitly.
RESERVED_PROVIDERS: list[Callable[[], Iterable[GeneratedNames]]] = []


def generated_namespaces() -> list[GeneratedNames]:
    """The language's own names plus every registered provider's namespaces."""
    return [LANGUAGE_NAMES, *(ns for provider in RESERVED_PROVIDERS for ns in provider())]


class BlockNames:
    """Checks, block by block, that each block's generated names meet neither the fixed names nor an earlier
    block's names, in every namespace; an error points at the later block's name."""

    def __init__(self, namespaces: Sequence[GeneratedNames]) -> None:
        self.namespaces = list(namespaces)
        self.owner: list[dict[str, str]] = [{} for _ in self.namespaces]  # generated name -> defining block

    def add(self, att: A.Attention) -> None:
        for ns, owner in zip(self.namespaces, self.owner, strict=True):
            mine = sorted(ns.block_names(att.name))
            for gen in mine:
                if gen in ns.fixed:
                    what = "is" if gen == att.name else f"would define '{gen}', which is"
                    raise SpecError(
                        f"attention '{att.name}' {what} a name the generated module defines for itself",
                        att.name_span,
                        hint="rename the attention",
                    )
                other = owner.get(gen)
                if other is not None:
                    both = "has the same name" if other == att.name else f"both would define '{gen}'"
                    raise SpecError(
                        f"attention '{att.name}' clashes with an earlier attention '{other}' ({both})",
                        att.name_span,
                        hint="rename one of them",
                    )
            for gen in mine:
                owner[gen] = att.name


@dataclass
class Scope:
    """What names mean inside one attention block."""

    tensors: dict[str, A.TensorParam] = field(default_factory=dict)
    tensor_types: dict[str, TensorType] = field(default_factory=dict)
    scalars: dict[str, A.ScalarParam] = field(default_factory=dict)
    sizes: dict[str, Span] = field(default_factory=dict)  # size symbol -> where it is first bound
    roles: dict[str, Role] = field(default_factory=dict)


def check_identifier(name: str, span: Span, what: str) -> None:
    """Names reach generated Python code, so only plain identifiers are allowed."""
    a_what = ("an " if what[0] in "aeiou" else "a ") + what
    if not _IDENT.match(name):
        raise SpecError(
            f"invalid {what} name '{name}'",
            span,
            hint="names start with a letter and hold letters, digits and '_' (a leading '_' is reserved)",
        )
    if keyword.iskeyword(name) or name in KEYWORDS:
        raise SpecError(f"'{name}' is a reserved word and cannot be {a_what} name", span)
    if name in INDEX_VARS or name in FUNCTIONS or name in GENERATED_NAMES:
        raise SpecError(f"'{name}' is a built-in name and cannot be {a_what} name", span)
    if what != "attention" and any(name in ns.fixed for ns in generated_namespaces()):
        # Generated functions read these module globals: a parameter or local of that name would shadow one.
        raise SpecError(f"'{name}' is a name of the generated module and cannot be {a_what} name", span)
    if hasattr(builtins, name) or name.startswith("__"):
        raise SpecError(f"'{name}' would shadow a Python built-in and cannot be {a_what} name", span)


def _is_size_symbol(name: str) -> bool:
    return name[:1].isupper()


def build_scope(att: A.Attention) -> Scope:
    check_identifier(att.name, att.name_span, "attention")
    scope = Scope()
    seen: dict[str, Span] = {}
    if len(att.params) > MAX_PARAMS:
        raise SpecError(
            f"attention '{att.name}' has {len(att.params)} parameters; at most {MAX_PARAMS} are supported",
            att.params[MAX_PARAMS].span,
            hint="gather related inputs into one tensor with an extra dimension (e.g. t: [P, H] read as t[p, h])",
        )
    for p in att.params:
        check_identifier(p.name, p.span, "parameter")
        if p.name in seen:
            raise SpecError(f"duplicate parameter '{p.name}'", p.span)
        seen[p.name] = p.span
        if isinstance(p, A.TensorParam):
            scope.tensors[p.name] = p
            scope.roles[p.name] = Role(p.name) if p.name in ("q", "k", "v") else Role.AUX
            if p.dtype is None:
                ttype = TensorType.FLOAT
            elif p.dtype in TENSOR_TYPES:
                ttype = TENSOR_TYPES[p.dtype]
            else:
                raise SpecError(
                    f"unknown tensor element type '{p.dtype}'",
                    p.dtype_span,
                    hint=did_you_mean(p.dtype, TENSOR_TYPES) or "one of " + ", ".join(TENSOR_TYPES),
                )
            if p.name in ("q", "k", "v") and ttype.kind is not DType.FLOAT:
                raise SpecError(f"'{p.name}' must be a floating-point tensor", p.dtype_span or p.span)
            scope.tensor_types[p.name] = ttype
            if not p.shape:
                raise SpecError(f"tensor parameter '{p.name}' needs at least one dimension", p.span)
        else:
            if p.name in ("q", "k", "v"):
                raise SpecError(f"'{p.name}' must be a tensor, like {p.name}: [B, H, N, D]", p.span)
            scope.scalars[p.name] = p
    for role in ("q", "k", "v"):
        if role not in scope.tensors:
            raise SpecError(
                f"attention '{att.name}' has no '{role}' parameter",
                att.name_span,
                hint="q, k and v are required, e.g. q: [B, H, M, D], k: [B, H, N, D], v: [B, H, N, D]",
            )
    # Defaults: Python's rule, so that the generated signature is valid.
    defaulted = False
    for p in att.params:
        has_default = isinstance(p, A.ScalarParam) and p.default is not None
        if defaulted and not has_default:
            raise SpecError(
                f"parameter '{p.name}' has no default but follows a parameter with one",
                p.span,
                hint="put parameters with defaults last",
            )
        defaulted = defaulted or has_default
    _bind_sizes(att, scope)
    return scope


def _bind_sizes(att: A.Attention, scope: Scope) -> None:
    # q, k, v: four plain dimensions each, with the sharing that attention implies.
    for role in ("q", "k", "v"):
        p = scope.tensors[role]
        if len(p.shape) != 4:
            raise SpecError(
                f"'{role}' must have four dimensions [batch, heads, length, channels], got {len(p.shape)}",
                p.span,
            )
        for dim in p.shape:
            if not isinstance(dim, A.Name | A.IntLit):
                raise SpecError(f"dimensions of '{role}' must be size symbols or integers", dim.span)
            if isinstance(dim, A.IntLit) and dim.value < 1:
                raise SpecError("a dimension must be at least 1", dim.span)
    q, k, v = (scope.tensors[r].shape for r in ("q", "k", "v"))

    def same(a: A.Expr, b: A.Expr, msg: str) -> None:
        if a != b:
            raise SpecError(
                msg,
                b.span,
                hint=f"write the same size symbol in both (found {dim_text(a)} and {dim_text(b)})",
            )

    same(q[0], k[0], "q and k must share the batch dimension")
    same(q[0], v[0], "q and v must share the batch dimension")
    same(q[3], k[3], "q and k must share the channel dimension (dot(q, k) sums over it)")
    same(k[1], v[1], "k and v must share the head dimension")
    same(k[2], v[2], "k and v must share the length dimension")

    # Bind every plain symbol, in declaration order.
    for p in att.params:
        if not isinstance(p, A.TensorParam):
            continue
        for dim in p.shape:
            if isinstance(dim, A.Name) and dim.id not in scope.scalars:
                if not _is_size_symbol(dim.id):
                    raise SpecError(
                        f"unknown name '{dim.id}' in a shape",
                        dim.span,
                        hint=did_you_mean(dim.id, scope.scalars)
                        or "size symbols are capitalised (B, H, N, D); lowercase names must be int parameters",
                    )
                check_identifier(dim.id, dim.span, "size symbol")
                if dim.id in scope.tensors:
                    raise SpecError(f"'{dim.id}' is both a size symbol and a tensor parameter", dim.span)
                scope.sizes.setdefault(dim.id, dim.span)


def dim_text(e: A.Expr, other: str = "an expression") -> str:
    """A plain dimension as written (`N`, `64`), else `other`."""
    if isinstance(e, A.Name):
        return e.id
    if isinstance(e, A.IntLit):
        return str(e.value)
    return other


def check_body(att: A.Attention) -> None:
    """Statement structure: one score, at most one of mask/norm/output, features for q or k once each."""
    seen: dict[str, A.Stmt] = {}
    lets: set[str] = set()
    for st in att.body:
        key = {
            A.ScoreStmt: "score",
            A.MaskStmt: "mask",
            A.NormStmt: "norm",
            A.OutputStmt: "output",
            A.StateStmt: "state",
            A.ReadStmt: "read",
        }.get(type(st))
        if isinstance(st, A.FeatureStmt):
            if st.target not in ("q", "k"):
                raise SpecError(
                    f"'feature' applies to q or k, not '{st.target}'",
                    st.target_span,
                    hint="write 'feature q = ...'",
                )
            key = f"feature {st.target}"
        if isinstance(st, A.Let):
            if st.name in lets:
                raise SpecError(f"'{st.name}' is already defined by an earlier 'let'", st.span)
            lets.add(st.name)
            continue
        assert key is not None
        if key in seen:
            line = seen[key].span.line
            raise SpecError(f"'{key}' is defined twice (first on line {line})", st.span)
        seen[key] = st
    if "state" in seen or "read" in seen:
        return  # a state block: its own statement rules are in dsl.state (check_state_body)
    if "score" not in seen:
        raise SpecError(
            f"attention '{att.name}' has no 'score' statement",
            att.name_span,
            hint="add e.g. 'score = dot(q, k) * D ** -0.5'",
        )
