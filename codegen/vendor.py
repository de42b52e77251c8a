"""`attnc codegen --standalone`: the runtime library vendored into a generated module, built as structure.

Each runtime module (and attnc/settings.py, the one attnc module the runtime imports) is parsed with `ast`;
its docstring, `__all__` and imports of attnc (absolute or relative) are dropped, its other imports are
hoisted and de-duplicated, and the remaining statements are concatenated in dependency order, then
unparsed. Statements named in `_OVERRIDES` are replaced by nodes built here: where the vendored copy must
differ from the library (the linear core's kernels sit in the module's own kernels file). A top-level name
defined by two runtime modules is an error, not a silent shadowing.
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
    for path in _MODULES:
        for node in _body(path):
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue  # the generated module starts with its own
            if _is_attnc_import(node):
                continue
            if isinstance(node, ast.Import | ast.ImportFrom):
                if ast.dump(node) not in seen_imports:
                    seen_imports.add(ast.dump(node))
                    imports.append(node)
                continue
            names = _defined(node)
            if any(n in _DROPPED for n in names):
                continue
            for n in names:
                if n in owner and owner[n] != path:
                    raise AssertionError(
                        f"runtime name {n} is defined in both {owner[n].name} and {path.name}"
                    )
                owner[n] = path
            if len(names) == 1 and names[0] in _OVERRIDES:
                node = _statement(_OVERRIDES[names[0]])
            definitions.append(node)
    return ast.Module(body=[*imports, *definitions], type_ignores=[])


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


__all__ = ["linear_kernels_module", "linear_kernels_source", "runtime_module", "runtime_source"]
