"""Convolution kernel variants: ``kernels.get(name)``, ``kernels.names()``.

Each family registers itself in its own module (``@register``); ``HARNESS_PLUGINS`` (a
comma-separated list of importable modules) adds kernels from outside the project.
"""

from .registry import DTYPES, Kernel, Run, get, names, register, weight_shape

__all__ = ["Kernel", "Run", "get", "names", "register", "weight_shape", "DTYPES"]
