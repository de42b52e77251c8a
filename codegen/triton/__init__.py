"""The Triton backend: IR -> fused FlashAttention-style kernels (forward and backward) in a generated module.

`expr.py` turns IR expressions into Triton tile code, `kernels.py` writes the kernels and their launcher,
`aot.py` compiles kernels ahead of time for NVIDIA targets on any CPU machine and reports their resources.
"""
