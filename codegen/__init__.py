"""attnc code generation: IR -> importable Python modules (PyTorch reference; Triton kernels later).

from attnc import codegen
mod = codegen.compile_file("examples/specs/alibi.attn")
o = mod.alibi(q, k, v, slopes)
"""

from __future__ import annotations

from .module import Target, compile_file, compile_source, generate
from .version import ATTNC_VERSION

__all__ = ["ATTNC_VERSION", "Target", "compile_file", "compile_source", "generate"]
