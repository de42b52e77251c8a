"""Schedule autotuning for generated kernels: search space, resource model, tuning key, storage, search.

`attnc tune` (cli.py) is the entry point; docs/autotune.md describes the whole package. Nothing here is
imported by generated modules: they read the exported best-config table (store.export_table) on their own.
"""
