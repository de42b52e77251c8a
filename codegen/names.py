"""The names the generator defines at module level, registered with the front end so that a block name (or a
parameter) can never replace one of them: `attnc.dsl.check.RESERVED_PROVIDERS` gets `generated_names`
when this package is imported (the front end cannot import the code generator; it offers the hook).

Two namespaces: the main module and the `*_triton.py` kernels file. Each has `fixed` names, written whatever
the spec, and `per_block` templates instantiated for every attention block (`_{name}_op` for block `a` is
`_a_op`). `attnc codegen --standalone` also defines every top-level name of the vendored runtime library;
those are read from the vendored statements themselves (so they follow the runtime as it changes) and passed
to the front end explicitly by that command, `generated_names(standalone=True)`, rather than parsed on every
compile. `module_level_names` reads generated text back; tests/test_generated_names.py checks, over every
zoo and example spec in both modes, that each name the generator actually emits is covered here.
"""

from __future__ import annotations

import ast
import functools

from attnc.dsl import check
from attnc.dsl.check import GeneratedNames

from . import vendor

# codegen/module.py: the module's imports, constants and runtime state.
MAIN_FIXED = frozenset(
    {
        "annotations",  # from __future__ import annotations
        "math",
        "Optional",
        "torch",
        "_require_runtime",
        "_rt",
        "_rt_lin",
        "BlockLayout",
        "_sigmoid_scalar",
        "ATTNC_VERSION",
        "LANGUAGE_VERSION",
        "SPEC_SHA256",
        "_OP_KEY",
        "__all__",
        "_BAKED_CONFIGS",  # codegen/bake.py, with --tuned-from
        "_STATE",
        "_fresh",  # codegen/reference.py: whether this process registered the block's custom ops
        "_",
    }
)
# codegen/reference.py and codegen/linear.py: each block's entry points and its custom op's pieces.
MAIN_PER_BLOCK = frozenset(
    {
        "{name}",
        "{name}_reference",
        "{name}_triton",
        "{name}_linear",
        "{name}_linear_varlen",
        "{name}_varlen",
        "{name}_paged",
        "_{name}_check_paged",
        "_{name}_varlen_op",
        "_{name}_op",
        "_{name}_aux_grads",
        # the backward ops, named in torch.ops.attnc as the block's op with `_backward` appended
        # (`attention_op.attention_ops`): a block `a_backward` would take `a`'s
        "_{name}_backward_op",
        "_{name}_varlen_backward_op",
    }
)
# codegen/triton/module.py: the kernels file's imports and helpers.
KERNELS_FIXED = frozenset({"triton", "tl", "_floordiv", "_floormod", "_tanh", "_pow", "_pow_int", "_dot_as"})
# codegen/triton/kernels.py: each block's kernels and their inlined inner loops.
KERNELS_PER_BLOCK = frozenset(
    {
        "_{name}_fwd_kernel",
        "_{name}_fwd_inner",
        "_{name}_fwd_split_kernel",
        "_{name}_fwd_combine_kernel",
        "_{name}_bwd_dkdv_kernel",
        "_{name}_dkdv_inner",
        "_{name}_bwd_dq_kernel",
        "_{name}_dq_inner",
    }
)


@functools.cache
def generated_names(standalone: bool = False) -> tuple[GeneratedNames, GeneratedNames]:
    """The main module's and the kernels file's names (the provider registered with the front end);
    `standalone`: with the vendored runtime's names."""
    main, kernels = MAIN_FIXED, KERNELS_FIXED
    if standalone:
        main |= module_level_names(vendor.runtime_module())
        kernels |= module_level_names(vendor.linear_kernels_module())
    return (
        GeneratedNames(fixed=main, per_block=MAIN_PER_BLOCK),
        GeneratedNames(fixed=kernels, per_block=KERNELS_PER_BLOCK),
    )


def register() -> None:
    """Put `generated_names` among the front end's providers (once)."""
    if generated_names not in check.RESERVED_PROVIDERS:
        check.RESERVED_PROVIDERS.append(generated_names)


class _Bindings(ast.NodeVisitor):
    """The names a module's own top-level code binds: assignments, imports, definitions, loop and `with`
    targets, at any depth of `if`/`try`/`for`/`with` blocks, but not inside functions, classes, lambdas or
    comprehensions (their names are local; walrus targets in comprehensions are ignored)."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.names.add(node.name)
        for d in node.decorator_list:
            self.visit(d)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.names.add(node.name)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        return

    def _comprehension(self, node: ast.AST) -> None:
        return

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension  # type: ignore[assignment]

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        self.names |= {(a.asname or a.name).split(".")[0] for a in node.names}

    visit_ImportFrom = visit_Import  # type: ignore[assignment]

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Store | ast.Del):
            self.names.add(node.id)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self.names.add(node.name)
        self.generic_visit(node)


def module_level_names(module: str | ast.Module) -> frozenset[str]:
    """Every name that a module (Python source text, or its ast) binds at module level."""
    v = _Bindings()
    v.visit(ast.parse(module) if isinstance(module, str) else module)
    return frozenset(v.names)
