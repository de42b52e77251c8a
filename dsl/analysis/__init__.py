"""Symbolic analyses of the IR (sympy): value ranges of index expressions, and (later) tile classification
of masks and separability of linear-family scores."""
