"""Whole-network inference engines: what a person could deploy instead of this project's sparse
network, timed beside it in the same ``e2e`` run.

Each engine is one module of this package that registers an ``Engine`` (adding one touches one
file; a module named in ``HARNESS_PLUGINS`` may register more). An engine has a name, says
whether it can run here (``available()``: None, or one line naming the install), its version
(part of its own rows' key, not of the machine's identity), the settings that decide its
figures (printed in the report), and ``prepare(model, example, threads)``: all building,
exporting and compiling, outside the timed region, returning ``y = run(x)`` on CPU tensors.

An engine runs the dense network (BN folded): the dense baselines. An engine that is a
``peer`` (a sparse engine: DeepSparse) or a ``control`` (does a dense engine gain from the
zeros?) also runs the masked network, the very masks the project's kernels use."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

DENSE, MASKED = "dense", "masked"


class Engine:
    """Subclass and ``register`` an instance. ``masked``: "peer" (a sparse engine the project
    is compared with), "control" (a dense engine run on the masked network too) or None."""

    name: str = ""
    label: str = ""
    install: str = ""  # how to get it, e.g. "pip install '.[peers]'"
    masked: str | None = None
    default: bool = True  # run unless left out; False: only when asked for by name
    module: str | None = None  # the Python package it needs: available() and version() ask it

    def available(self) -> str | None:
        if self.module is None:
            return None
        try:
            importlib.import_module(self.module)
        except ImportError:
            return f"{self.module} is not installed ({self.install})"
        return None

    def version(self) -> str:
        return importlib.import_module(self.module).__version__ if self.module else ""

    def settings(self, threads: int) -> dict:
        return {}

    def prepare(self, model, example, threads: int) -> Callable:
        raise NotImplementedError


_ENGINES: dict[str, Engine] = {}
_loaded = False


def register(engine: Engine) -> Engine:
    if not engine.name or engine.name in _ENGINES and type(_ENGINES[engine.name]) is not type(
            engine):
        raise ValueError(f"engine name {engine.name!r} is empty or already registered")
    _ENGINES[engine.name] = engine
    return engine


def _load() -> None:
    global _loaded
    if _loaded:
        return
    from kernels.registry import import_plugin, plugin_modules

    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_") and mod.name != "alone":
            importlib.import_module(f"{__name__}.{mod.name}")
    for name in plugin_modules():
        import_plugin(name)
    _loaded = True


def names(all_: bool = False) -> list[str]:
    """Registered engines in registration order (``all_``: those run only on request too)."""
    _load()
    return [n for n, e in _ENGINES.items() if all_ or e.default]


def get(name: str) -> Engine:
    _load()
    if name not in _ENGINES:
        raise KeyError(f"unknown engine {name!r}; registered: {', '.join(_ENGINES)}")
    return _ENGINES[name]


@dataclass(frozen=True)
class Variant:
    """One engine on one network: ``onnxruntime@dense``, ``deepsparse@masked``."""

    engine: str
    network: str

    @property
    def name(self) -> str:
        return f"{self.engine}@{self.network}"

    @classmethod
    def parse(cls, name: str) -> Variant:
        engine, _, network = name.partition("@")
        return cls(engine, network)


def variants(chosen: list[str]) -> list[Variant]:
    """Every network each chosen engine runs: the dense one, and the masked one for peers and
    controls."""
    out = []
    for n in chosen:
        e = get(n)
        out.append(Variant(n, DENSE))
        if e.masked:
            out.append(Variant(n, MASKED))
    return out


@functools.cache
def versions(chosen: tuple[str, ...]) -> dict[str, str | None]:
    """Engine -> version, or None where it is not available here (per process)."""
    out = {}
    for n in chosen:
        e = get(n)
        out[n] = None if e.available() else e.version()
    return out
