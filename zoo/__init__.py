"""The model zoo: attention variants of the literature as attnc specs and layers.

Not implemented yet (see the model-zoo issue); `examples/specs/` holds the specs available today.
"""
