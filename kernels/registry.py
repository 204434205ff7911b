"""Kernel registry: each kernel family registers itself where it is defined (``@register``)."""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import itertools
import os
import pkgutil
from pathlib import Path

import torch

import shapes

from . import patterns as P

_REGISTRY: dict[str, Kernel] = {}
_loaded = False
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HERE = Path(__file__).resolve().parent


class KernelBuildError(RuntimeError):
    """A kernel's code could not be built (C++ compiler, Triton compile): ``compile_error``."""


class PluginError(RuntimeError):
    """A module named in ``HARNESS_PLUGINS`` cannot be imported (the message is one line)."""


def plugin_modules() -> list[str]:
    """The modules ``HARNESS_PLUGINS`` names (comma-separated)."""
    return [m.strip() for m in os.environ.get("HARNESS_PLUGINS", "").split(",") if m.strip()]


def import_plugin(name: str):
    """Import one plugin module; a missing module, or one that fails as it is imported, is a
    ``PluginError`` that says which and why."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name or name.startswith(f"{e.name}."):  # the plugin itself is missing
            raise PluginError(f"HARNESS_PLUGINS names {name!r}, which is not an importable "
                              f"module (is its folder on PYTHONPATH?)") from None
        raise PluginError(f"plugin {name!r} (HARNESS_PLUGINS) failed as it was imported: "
                          f"ModuleNotFoundError: {e}") from None
    except Exception as e:  # noqa: BLE001 - any failure of someone else's module
        what = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PluginError(f"plugin {name!r} (HARNESS_PLUGINS) failed as it was imported: "
                          f"{type(e).__name__}: {what}"[:400]) from None


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: GPU kernels run through Triton's interpreter on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class Run:
    """What ``Kernel.prepare`` returns: ``y = run(x)`` (NCHW in and out; ``out=`` writes into a
    given tensor), ``masked_weight`` (the dense OIHW weight the kernel computes with) and, where
    the kernel has its own input layout, ``layout(x)`` plus ``resident(xl)`` so kernel-only time
    can be measured without the layout conversion. C++ CPU kernels also offer ``fused`` (bias
    and ReLU in the kernel's epilogue, input already laid out, output written into the next
    layer's layout: see ``kernels.cpu_common.make_run``; a channels-last kernel's ``fused`` and
    ``resident`` return channels-last tensors, ``kernels.cs_nhwc``)."""

    def __init__(self, masked_weight, call, layout=None, resident=None, info=None, perm=None,
                 fused=None):
        self.masked_weight = masked_weight
        self.fused = fused
        self._call = call
        self.layout = layout
        self.resident = resident
        self.info = dict(info or {})
        self.perm = perm  # output-channel order a permuting pattern grouped by (for its check)
        self.cpu_layout = None  # a C++ CPU kernel's input layout (kernels.cpu_layout.CpuLayout)

    @property
    def has_resident(self) -> bool:
        return self.resident is not None and self.layout is not None

    def __call__(self, x, out=None):
        return self._call(x, out)


class Kernel:
    """Base class. Subclasses set ``name``, ``pattern``, ``device``, ``space`` (parameter ->
    candidate values, pattern parameters included) and implement ``_reason``, ``_default`` and
    ``_prepare``."""

    name = "kernel"
    pattern = "dense"
    device = "cpu"
    space: dict[str, tuple] = {}
    pattern_params: tuple[str, ...] = ()  # keys of a config that parameterize the pattern
    dtypes: tuple[str, ...] = ("float32",)
    sources: tuple[str, ...] = ()  # files (relative to kernels/) the kernel also depends on
    baseline = False
    # where several kernels of a pattern support a layer, a network without a plan runs the one
    # of lowest rank (then the first by name): a kernel measured faster ranks lower
    default_rank = 1

    # ---- availability ---------------------------------------------------------------------
    def available(self) -> str | None:
        """None when the kernel can run on this machine, else why not. GPU kernels also run
        under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors."""
        if self.device == "cuda" and not torch.cuda.is_available() and not interpreting():
            return "no CUDA device on this machine"
        return None

    def build(self) -> None:
        """Build what the kernel needs before its first case (raises KernelBuildError)."""

    # ---- configs ----------------------------------------------------------------------------
    def _check_config(self, config) -> str | None:
        bad = sorted(set(config) - set(self.space))
        if bad:
            return f"{self.name} has no parameter(s) {bad}; valid: {sorted(self.space)}"
        for k, v in config.items():
            if v not in self.space[k]:
                return f"{self.name}: {k}={v!r} is not in its space {list(self.space[k])}"
        return None

    def supports(self, layer, sparsity, config=None, dtype="float32") -> str | None:
        """None when (layer, sparsity, config, dtype) can run, else the reason it cannot."""
        why = self.available()
        if why:
            return why
        if dtype not in self.dtypes:
            return f"{self.name} supports dtypes {list(self.dtypes)}, not {dtype}"
        if layer.groups != 1 and not getattr(self, "grouped", False):
            return f"{self.name} does not support grouped convolution (groups={layer.groups})"
        if layer.dilation != 1 and not getattr(self, "dilated", False):
            return f"{self.name} does not support dilation {layer.dilation}"
        if self.pattern != "dense":
            try:
                P.check_sparsity(sparsity)
            except ValueError as e:
                return str(e)
        cfg = self.full_config(layer, sparsity, config)
        if isinstance(cfg, str):
            return cfg
        why = self._check_config(cfg)
        if why:
            return why
        if self.pattern != "dense":
            try:
                pat = self.make_pattern(sparsity, cfg)
            except ValueError as e:
                return str(e)
            why = pat.unsupported(weight_shape(layer))
            if why:
                return why
        return self._reason(layer, sparsity, cfg)

    def full_config(self, layer, sparsity, config=None):
        """The default config updated by ``config`` (or a reason string when no default). The
        defaults are computed for the pattern parameters ``config`` pins (a swept 1xN N=4 gets
        the tile that suits N=4, not the one computed for the default N)."""
        config = dict(config or {})
        pinned = {k: config[k] for k in self.pattern_params if k in config}
        base = self.default_config(layer, sparsity, pinned)
        if base is None:
            return f"{self.name} has no valid configuration for {layer.shape_str} at S={sparsity}"
        return {**base, **config}

    def default_config(self, layer, sparsity, pinned=None) -> dict | None:
        """The configuration used when none is given; ``pinned`` fixes pattern parameters."""
        base = self._default(layer, sparsity, dict(pinned or {}))
        return None if base is None else {**base, **(pinned or {})}

    def configs(self, layer, sparsity, dtype="float32", fixed=None) -> list[dict]:
        """Every supported point of ``space`` (``fixed`` pins some parameters)."""
        keys = list(self.space)
        out = []
        for vals in itertools.product(*(self.space[k] for k in keys)):
            cfg = dict(zip(keys, vals))
            if fixed and any(cfg.get(k) != v for k, v in fixed.items() if k in cfg):
                continue
            if self.supports(layer, sparsity, cfg, dtype) is None:
                out.append(cfg)
        return out

    def make_pattern(self, sparsity, config):
        return P.make(self.pattern, sparsity, **{k: config[k] for k in self.pattern_params
                                                 if k in config})

    def prepare(self, layer, weight, sparsity, config=None) -> Run:
        """Mask and encode ``weight`` for this kernel; the returned ``run`` is the timed part."""
        if tuple(weight.shape) != weight_shape(layer):
            raise ValueError(f"{self.name}: weight shape {tuple(weight.shape)} does not match "
                             f"layer {layer.shape_str}")
        why = self.supports(layer, sparsity, config, _dtype_name(weight.dtype))
        if why:
            raise ValueError(why)
        return self._prepare(layer, weight, sparsity, self.full_config(layer, sparsity, config))

    # ---- subclass hooks ----------------------------------------------------------------------
    def _reason(self, layer, sparsity, config) -> str | None:
        return None

    def _default(self, layer, sparsity, pinned) -> dict | None:
        return {k: v[0] for k, v in self.space.items()}

    def _prepare(self, layer, weight, sparsity, config) -> Run:
        raise NotImplementedError

    # ---- identity ------------------------------------------------------------------------------
    def source_files(self) -> list[Path]:
        """Every file whose contents decide what this kernel computes: its module (for a
        plugin, the plugin's file), the registry (preparation, configuration), its pattern's
        module and the patterns' shared code, and the shared files it declares in ``sources``
        (C++, layout, launch helpers)."""
        files = [Path(inspect.getsourcefile(type(self))).resolve(), HERE / "registry.py"]
        files += [HERE / s for s in self.sources]
        if self.pattern in P.PATTERNS:
            files.append(Path(P.__file__).resolve())
            files += [Path(inspect.getsourcefile(P.PATTERNS[self.pattern])).resolve(),
                      Path(inspect.getsourcefile(P.Pattern)).resolve()]
        return list(dict.fromkeys(files))

    def source_hash(self) -> str:
        """Hash of the contents of ``source_files()``: an uncommitted edit changes exactly the
        kernels that depend on the edited file."""
        h = hashlib.sha256()
        for f in self.source_files():
            h.update(f.name.encode())
            h.update(_file_digest(f, *_stamp(f)))
        return h.hexdigest()[:16]

    def __repr__(self):
        return f"<Kernel {self.name} pattern={self.pattern} device={self.device}>"


def _stamp(path: Path) -> tuple:
    try:
        st = path.stat()
        return st.st_mtime_ns, st.st_size
    except OSError:
        return None, None


@functools.lru_cache(maxsize=256)
def _file_digest(path: Path, mtime_ns, size) -> bytes:
    """A file's content digest, read again only when its modification stamp changes (every
    case and tuning candidate asks for its kernel's source hash)."""
    return hashlib.sha256(path.read_bytes()).digest() if mtime_ns is not None else b"<missing>"


def _dtype_name(dt) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dt, str(dt))


def register(cls):
    """Class decorator: instantiate and register a Kernel subclass under ``cls.name``."""
    inst = cls()
    if inst.name in _REGISTRY and type(_REGISTRY[inst.name]).__qualname__ != cls.__qualname__:
        raise ValueError(f"kernel name {inst.name!r} is registered twice")
    _REGISTRY[inst.name] = inst
    return cls


def builtin_modules() -> list[str]:
    """Every module of the kernels package (kernel families register when imported): adding a
    kernel is adding one file."""
    return [f"kernels.{m.name}" for m in pkgutil.iter_modules([str(HERE)])
            if not m.name.startswith("_") and m.name != "patterns"]


def _load() -> None:
    global _loaded
    if _loaded:
        return
    for mod in builtin_modules():
        importlib.import_module(mod)
    for mod in plugin_modules():  # a failing plugin fails every lookup, not only the first
        import_plugin(mod)
    _loaded = True


def get(name: str) -> Kernel:
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"unknown kernel {name!r}; valid: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def names(device: str | None = None, pattern: str | None = None) -> list[str]:
    _load()
    return sorted(n for n, k in _REGISTRY.items()
                  if (device is None or k.device == device)
                  and (pattern is None or k.pattern == pattern))


def pick_divisor(values, n: int, prefer: int) -> int:
    """``prefer`` when it divides ``n``, else the largest of ``values`` that does (a kernel's
    default for V or N; an unsupported choice still reports its reason in ``supports``)."""
    ok = [v for v in values if n % v == 0]
    return prefer if prefer in ok else (max(ok) if ok else prefer)


def weight_shape(layer: shapes.ConvLayer) -> tuple:
    return (layer.cout, layer.cin // layer.groups, layer.kh, layer.kw)
