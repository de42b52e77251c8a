"""Schedule autotuning for generated kernels (search space, tuning key, store, search).

Not implemented yet: it arrives with the Triton backend (see the autotuner issue). The reference backend
has no schedule to tune.
"""
