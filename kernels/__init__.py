"""Convolution kernel variants: ``kernels.get(name)``, ``kernels.names()``.

Every module of this package is imported on first use and each kernel family registers itself
there (``@register``): adding a kernel is adding one file. ``HARNESS_PLUGINS`` (a
comma-separated list of importable modules) adds kernels from outside the project.
"""

from .registry import (
    DTYPES,
    Kernel,
    KernelBuildError,
    PluginError,
    Run,
    get,
    interpreting,
    names,
    register,
    weight_shape,
)

__all__ = ["Kernel", "KernelBuildError", "PluginError", "Run", "get", "names", "register", "weight_shape",
           "DTYPES", "interpreting"]
