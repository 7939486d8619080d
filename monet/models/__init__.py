"""Models monet serves first, written to trace cleanly, with a registry by name.

    >>> import monet.models
    >>> model = monet.models.create("convnext_t")
    >>> monet.models.names()

Every module in this package registers its configurations with
:func:`register`; they are imported on the first call to :func:`create` or
:func:`names`, so ``import monet`` stays cheap.
"""

from monet.models.registry import ModelSpec, create, example_inputs, names, register, spec

__all__ = ["ModelSpec", "create", "example_inputs", "names", "register", "spec"]
