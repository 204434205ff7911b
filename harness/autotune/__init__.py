"""Autotuner: for a net, pattern and sparsity on this machine, the kernel and configuration each
layer should use. Strategies (one module each, loaded lazily by name) only choose; the harness
runner measures, with its correctness gate and typed failures."""

import importlib

STRATEGIES = {"exhaustive": "exhaustive", "random": "random_search", "model": "model",
              "tpe": "tpe"}


def strategy(name: str):
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    return importlib.import_module(f"{__name__}.{STRATEGIES[name]}").Strategy
