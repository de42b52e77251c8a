"""`attnc codegen --standalone`: the runtime library vendored into a generated module, built as structure.

Each runtime module (and attnc/settings.py, the one attnc module the runtime imports) is parsed with `ast`;
its docstring, `__all__` and imports of attnc (absolute or relative) are dropped, its other imports are
hoisted and de-duplicated, and the remaining statements are concatenated in dependency order, then
unparsed. Statements named in `_OVERRIDES` are replaced by nodes built here: where the vendored copy must
differ from the library (the linear core's kernels sit in the module's own kernels file). A top-level name
defined by two runtime modules is an error, not a silent shadowing.

The delta-rule runtime (state blocks) is listed in one table, `_DELTA`: each runtime module with the Triton
kernels file it loads. Its modules are vendored like the others, except that every top-level name a delta
module defines takes the module's prefix (`delta_rule` -> `_delta__delta_rule`, `_Rename`): delta.py shares
private names with the rest of the runtime (`_next_pow2`, `_Seqs`, each defined differently) and public ones
with the zoo's blocks (its `gla` beside the generated `gla`); the generated module's `_rt_delta` namespace
maps the library names back (`delta_namespace`). Each of its kernels files becomes a sibling
file of the generated module, `STEM_<kernels file>` (`gated_deltanet_delta_kernels.py` beside
`gated_deltanet.py`), a verbatim copy under a generated header, and the vendored runtime's references to it —
any string constant equal to the file's name, e.g. `Path(__file__).with_name("delta_kernels.py")` — are
rewritten to that sibling's name (`Path(__file__).stem + "_delta_kernels.py"`), so the library's own loader
runs unchanged. Sibling files rather than one concatenated kernels file, because the delta kernels files are
written independently of each other and of the module's generated kernels: each is loaded by path as its own
module in the library and may define the same private helpers as another (`_dsum`, `_load_vec`, ...), which
one shared namespace would turn into clashes (or into reserved names a block could no longer take); copied
whole, each keeps exactly the namespace it has in the library, and no loader needs overriding statement by
statement (delta.py keeps changing). A kernels file named nowhere in the vendored runtime, or a runtime
string naming a `*_kernels.py` of attnc/runtime that is not in a table, is an error when vendoring.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import attnc.runtime
import attnc.settings

_RUNTIME = Path(attnc.runtime.__file__).parent
# Dependency order: a module comes after every module it imports from.
_MODULES = (
    Path(attnc.settings.__file__),
    _RUNTIME / "__init__.py",
    _RUNTIME / "signature.py",
    _RUNTIME / "core_abi.py",
    _RUNTIME / "checks.py",
    _RUNTIME / "reference.py",
    _RUNTIME / "layout.py",
    _RUNTIME / "varlen.py",
    _RUNTIME / "paged.py",
    _RUNTIME / "triton.py",
    _RUNTIME / "tuning.py",
    _RUNTIME / "ops.py",
    _RUNTIME / "attention_op.py",
    _RUNTIME / "compat.py",
    _RUNTIME / "linear.py",
)
# The delta-rule runtime (state blocks): (runtime module, the kernels file it loads, or None), in dependency
# order — a module after every delta module it imports from (its other imports are among `_MODULES`). This is
# the one list of delta runtime files that --standalone vendors. New delta runtime files are being written
# alongside delta.py (delta_chunk.py + delta_chunk_kernels.py, delta_chunk_bwd.py + delta_chunk_bwd_kernels.py,
# which delta.py will import): the lead adds each here, before delta.py, when it is merged; nothing else in
# this file needs to change as long as the module names its kernels file by a string constant.
_DELTA: tuple[tuple[str, str | None], ...] = (
    ("delta_chunk.py", "delta_chunk_kernels.py"),
    ("delta_chunk_bwd.py", "delta_chunk_bwd_kernels.py"),
    ("delta.py", "delta_kernels.py"),
)
# attnc.runtime.delta: the module the generated code calls (as `_rt_delta`, codegen/delta.py).
_DELTA_ENTRY = "delta.py"
# The library loads the linear core from its own linear_kernels.py; a standalone module appends the core to
# its kernels file (`linear_kernels_source`), which the vendored loader reads instead.
_OVERRIDES = {
    "_LINEAR_KERNELS": "_LINEAR_KERNELS = Path(__file__).with_name(Path(__file__).stem + '_triton.py')",
}
# Names the vendored runtime leaves out: the library package's lazy attribute hook and its table.
_DROPPED = {"__all__", "__getattr__", "_PUBLIC"}


def _statement(code: str) -> ast.stmt:
    """One statement built here (fixed text of this file, never spec text)."""
    (node,) = ast.parse(code).body
    return node


def _is_attnc_import(node: ast.stmt) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == "attnc"
    if isinstance(node, ast.Import):
        return any(a.name.split(".")[0] == "attnc" for a in node.names)
    return False


def _defined(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _body(path: Path) -> list[ast.stmt]:
    stmts = ast.parse(path.read_text(encoding="utf-8"), str(path)).body
    if stmts and isinstance(stmts[0], ast.Expr) and isinstance(stmts[0].value, ast.Constant):
        stmts = stmts[1:]  # the module docstring
    return stmts


@functools.cache
def runtime_source() -> str:
    """The vendored runtime: imports first, then every module's definitions, as Python source."""
    header = "# ---- the attnc runtime library, vendored (`attnc codegen --standalone`) ----\n"
    return header + ast.unparse(ast.fix_missing_locations(runtime_module())) + "\n"


@functools.cache
def runtime_module() -> ast.Module:
    """The vendored runtime as an ast module (`runtime_source`'s statements; codegen.names reads its names)."""
    imports: list[ast.stmt] = [_statement("import types")]
    seen_imports = {ast.dump(imports[0])}
    definitions: list[ast.stmt] = []
    owner: dict[str, Path] = {}
    siblings = {k: f"_{k}" for _, k in _DELTA if k is not None}  # kernels file -> the sibling's suffix
    named: set[str] = set()
    modules = [(p, {}) for p in _MODULES] + [(_RUNTIME / m, _delta_names(m)) for m, _ in _DELTA]
    done: set[str] = set()  # the modules vendored so far, by name (`varlen`, `settings`, `runtime`)
    for path, rename in modules:
        for node in _body(path):
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue  # the generated module starts with its own
            if _is_attnc_import(node):
                source = (node.module or "").split(".")[-1] if isinstance(node, ast.ImportFrom) else ""
                if source not in done:  # its names would be missing from the vendored runtime
                    raise AssertionError(
                        f"{path.name}: `{ast.unparse(node)[:80]}` imports from attnc what codegen/vendor.py "
                        "does not vendor before it (a new delta runtime module goes into _DELTA, in "
                        "dependency order)"
                    )
                continue
            if isinstance(node, ast.Import | ast.ImportFrom):
                if ast.dump(node) not in seen_imports:
                    seen_imports.add(ast.dump(node))
                    imports.append(node)
                continue
            names = _defined(node)
            if any(n in _DROPPED for n in names):
                continue
            if len(names) == 1 and names[0] in _OVERRIDES:
                node = _statement(_OVERRIDES[names[0]])
            node = _SiblingKernels(siblings, named, path).visit(_Rename(rename).visit(node))
            for n in _defined(node):
                if n in owner and owner[n] != path:
                    raise AssertionError(
                        f"runtime name {n} is defined in both {owner[n].name} and {path.name}"
                    )
                owner[n] = path
            definitions.append(node)
        done.add(path.parent.name if path.stem == "__init__" else path.stem)
    if missing := sorted(set(siblings) - named):
        raise AssertionError(
            f"no vendored runtime module names the kernels file(s) {', '.join(missing)} (by a string constant); "
            "the --standalone module could not load them"
        )
    return ast.Module(body=[*imports, *definitions], type_ignores=[])


def _prefix(module: str) -> str:
    """What the vendored names of the delta module `module` start with: `_delta__` for delta.py."""
    return f"_{Path(module).stem}__"


@functools.cache
def _delta_names(module: str) -> dict[str, str]:
    """A delta module's names -> their vendored names: every top-level definition of its own gets the module's
    prefix (`delta_rule` -> `_delta__delta_rule`), so that it cannot clash with a name of the rest of the
    runtime (layout.py and delta.py each define a different `_next_pow2`), of another delta module, or of
    the generated module (a block named `gla` next to delta.py's `gla`); a name it imports from another delta
    module maps to that module's vendored name, one it imports from the rest of the runtime keeps its name
    (those share one namespace already)."""
    delta = {Path(m).stem: m for m, _ in _DELTA}
    out: dict[str, str] = {}
    for node in _body(_RUNTIME / module):
        if isinstance(node, ast.ImportFrom) and _is_attnc_import(node):
            source = (node.module or "").split(".")[-1]
            for alias in node.names:
                if alias.name == "*":
                    raise AssertionError(f"{module}: `from {node.module} import *` cannot be vendored")
                local = alias.asname or alias.name
                if source in delta and source != Path(module).stem:
                    out[local] = _delta_names(delta[source]).get(alias.name, alias.name)
                elif local != alias.name:
                    out[local] = alias.name
        elif not isinstance(node, ast.Import | ast.ImportFrom):
            for n in _defined(node):
                if n not in _DROPPED:
                    out[n] = _prefix(module) + n
    return out


def delta_namespace() -> dict[str, str]:
    """What `attnc.runtime.delta` names (its definitions and what it imports from the runtime) -> the name
    each has in the vendored runtime: the generated module's `_rt_delta` namespace, which its state blocks
    call as they call the library module."""
    names = {n: n for n in module_level_names_of(_RUNTIME / _DELTA_ENTRY)}
    return {**names, **_delta_names(_DELTA_ENTRY)}


def module_level_names_of(path: Path) -> list[str]:
    """The names a runtime module binds at top level by definitions and by imports from attnc."""
    out: list[str] = []
    for node in _body(path):
        if isinstance(node, ast.ImportFrom) and _is_attnc_import(node):
            out += [a.asname or a.name for a in node.names]
        elif not isinstance(node, ast.Import | ast.ImportFrom):
            out += [n for n in _defined(node) if n not in _DROPPED]
    return out


class _Rename(ast.NodeTransformer):
    """Renames the module-level (global) names in `mapping` wherever a statement refers to them: a name that a
    function, lambda, comprehension or class body binds for itself (a parameter, a local, a dataclass field)
    is left alone inside that scope, as are attributes and keyword names."""

    def __init__(self, mapping: dict[str, str]) -> None:
        self.mapping = mapping
        self.scopes: list[tuple[bool, set[str]]] = []  # (a class body, the names it binds), innermost last

    def _global(self, name: str) -> bool:
        for i, (is_class, bound) in enumerate(reversed(self.scopes)):
            if (not is_class or i == 0) and name in bound:
                return False
        return True

    def _new(self, name: str) -> str:
        return self.mapping.get(name, name) if self._global(name) else name

    def visit_Name(self, node: ast.Name) -> ast.Name:
        node.id = self._new(node.id)
        return node

    def visit_Global(self, node: ast.Global) -> ast.Global:
        node.names = [self.mapping.get(n, n) for n in node.names]
        return node

    def _scope(self, node: ast.AST, body: list[ast.AST], is_class: bool, args: ast.arguments | None) -> None:
        bound = _bound(body, args)
        self.scopes.append((is_class, bound))
        for child in body:
            self.visit(child)
        self.scopes.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        for d in node.decorator_list:
            self.visit(d)
        self._arguments_outside(node.args)
        if node.returns is not None:
            self.visit(node.returns)
        if not self.scopes:
            node.name = self.mapping.get(node.name, node.name)
        self._scope(node, node.body, False, node.args)
        return node

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Lambda(self, node: ast.Lambda) -> ast.AST:
        self._arguments_outside(node.args)
        self._scope(node, [node.body], False, node.args)
        return node

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        for child in (*node.decorator_list, *node.bases, *node.keywords):
            self.visit(child)
        if not self.scopes:
            node.name = self.mapping.get(node.name, node.name)
        self._scope(node, node.body, True, None)
        return node

    def _comprehension(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp) -> ast.AST:
        self.visit(node.generators[0].iter)  # evaluated in the enclosing scope
        bound = {n.id for g in node.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)}
        self.scopes.append((False, bound))
        for i, g in enumerate(node.generators):
            self.visit(g.target)
            if i:
                self.visit(g.iter)
            for cond in g.ifs:
                self.visit(cond)
        for part in (node.key, node.value) if isinstance(node, ast.DictComp) else (node.elt,):
            self.visit(part)
        self.scopes.pop()
        return node

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension  # type: ignore[assignment]

    def _arguments_outside(self, args: ast.arguments) -> None:
        """Defaults and annotations are evaluated where the function is defined."""
        for d in (*args.defaults, *(d for d in args.kw_defaults if d is not None)):
            self.visit(d)
        for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg):
            if a is not None and a.annotation is not None:
                self.visit(a.annotation)


def _bound(body: list[ast.AST], args: ast.arguments | None) -> set[str]:
    """The names a scope binds for itself: its parameters and what its own statements bind (not those of nested
    functions, classes, lambdas or comprehensions, which bind their names only), less its `global` names."""
    bound: set[str] = set()
    declared: set[str] = set()
    if args is not None:
        bound |= {
            a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg) if a
        }
    todo = list(body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
            todo += node.decorator_list
            continue
        if isinstance(node, ast.Lambda | ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp):
            continue
        if isinstance(node, ast.Global):
            declared |= set(node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
            bound.add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.MatchAs | ast.MatchStar) and node.name:
            bound.add(node.name)
        todo += ast.iter_child_nodes(node)
    return bound - declared


class _SiblingKernels(ast.NodeTransformer):
    """Rewrites each string constant naming a table kernels file (`"delta_kernels.py"`) to the standalone
    sibling's name (`Path(__file__).stem + "_delta_kernels.py"`); a constant naming another kernels file of
    the runtime is an error (a file the vendored module would look for beside itself and not find)."""

    def __init__(self, siblings: dict[str, str], named: set[str], path: Path) -> None:
        self.siblings, self.named, self.path = siblings, named, path

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.JoinedStr:
        return node  # f-string text (messages) names files, it does not open them

    def visit_Constant(self, node: ast.Constant) -> ast.expr:
        if not isinstance(node.value, str):
            return node
        if node.value in self.siblings:
            self.named.add(node.value)
            new = ast.parse(f"Path(__file__).stem + {self.siblings[node.value]!r}", mode="eval").body
            return ast.copy_location(new, node)
        if node.value.endswith("_kernels.py") and (_RUNTIME / node.value).exists():
            raise AssertionError(
                f"{self.path.name} names the runtime kernels file {node.value}, which codegen/vendor.py does not "
                "vendor: add it to _DELTA (or an override)"
            )
        return node


def linear_kernels_source() -> str:
    """The linear core's kernels (attnc/runtime/linear_kernels.py) without docstring and imports, for a
    standalone module's kernels file (which imports triton itself)."""
    return ast.unparse(linear_kernels_module()) + "\n"


def linear_kernels_module() -> ast.Module:
    """`linear_kernels_source` as an ast module."""
    stmts = [
        n for n in _body(_RUNTIME / "linear_kernels.py") if not isinstance(n, ast.Import | ast.ImportFrom)
    ]
    return ast.Module(body=stmts, type_ignores=[])


def delta_kernel_files() -> tuple[tuple[str, str], ...]:
    """The delta runtime's kernels files as a standalone module's siblings: (suffix of the sibling's name after
    the module's stem, the library file's text), in `_DELTA` order. They import only triton (checked)."""
    out = []
    for _, kernels in _DELTA:
        if kernels is None:
            continue
        text = (_RUNTIME / kernels).read_text(encoding="utf-8")
        if any(_is_attnc_import(n) for n in ast.walk(ast.parse(text, kernels)) if isinstance(n, ast.stmt)):
            raise AssertionError(f"{kernels} imports attnc: it cannot be copied into a standalone module")
        out.append((f"_{kernels}", text))
    return tuple(out)


__all__ = [
    "delta_kernel_files",
    "delta_namespace",
    "linear_kernels_module",
    "linear_kernels_source",
    "runtime_module",
    "runtime_source",
]
