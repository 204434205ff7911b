"""Sweep construction: layers x sparsities x kernels x pattern parameters -> cases
(:class:`harness.records.Case`). Combinations a kernel cannot run are kept as cases with their
reason (``unsupported``), never dropped."""

from __future__ import annotations

import kernels
import shapes

from . import baseline, gpu
from .records import Case, Config, Device

SPARSITIES = (0.5, 0.75, 0.875, 0.9375)
# the CS paper's mapped ResNet50 layers (see shared mapping rule): the quick set
QUICK_LAYERS = ("layer1.0.conv3", "layer2.0.conv2", "layer4.0.conv2")


def make_case(layer, kernel, sparsity, config, batch, dtype, device, threads, param=None,
              reason=None) -> Case:
    device = Device(device)
    return Case(layer=layer, kernel=kernel.name, pattern=kernel.pattern, sparsity=sparsity,
                config=Config(config), batch=batch, dtype=dtype, device=device,
                threads=threads, source_hash=kernel.source_hash(), param=Config(param or {}),
                unsupported=reason,
                cudnn=gpu.cudnn_version() if device is Device.CUDA else None)


def select_layers(nets, layer_names=None, quick=False, shapes_csv=None, notes=None):
    """Unique shapes of the chosen nets (each with its ``count``), optionally filtered by layer
    name or catalog index. A layer merged into an earlier one of the same shape selects that
    shape; ``notes`` (a list), when given, receives a sentence saying so for each such name."""
    every, layers = [], []
    for net in nets:
        all_layers = shapes.load(net)
        uniq = shapes.unique(all_layers)
        if quick and not layer_names:
            uniq = [u for u in uniq if u.name in QUICK_LAYERS] or uniq[:3]
        every += all_layers
        layers += uniq
    if shapes_csv:
        all_layers = shapes.load_csv(shapes_csv)
        every += all_layers
        layers += shapes.unique(all_layers)
    if not layer_names:
        return layers
    measured_as = {(lay.net, lay.shape_key): lay for lay in layers}
    by_name: dict[str, list] = {}  # a name or index -> the unique shapes it selects
    for lay in every:
        rep = measured_as.get((lay.net, lay.shape_key))
        for key in (lay.name, str(lay.index)):
            if rep is not None and rep not in by_name.setdefault(key, []):
                by_name[key].append(rep)
    missing = [n for n in dict.fromkeys(layer_names) if n not in by_name]
    if missing:
        raise ValueError(f"unknown layer(s) {sorted(missing)}; names look like "
                         f"{', '.join(sorted({lay.name for lay in layers})[:4])}, ...")
    chosen = set()
    for name in dict.fromkeys(layer_names):
        for rep in by_name[name]:
            chosen.add((rep.net, rep.shape_key))
            if rep.name != name and str(rep.index) != name and notes is not None:
                notes.append(f"{rep.net}:{name} has the shape of {rep.name} ({rep.shape_str}); "
                             f"it is measured as {rep.name}")
    return [lay for lay in layers if (lay.net, lay.shape_key) in chosen]


def pattern_param_values(kernel, layer, sparsity, quick=False):
    """``(name, values)`` of the pattern's free parameter this kernel sweeps (M for CS, N for
    1xN, G for CCI, ...); the quick set keeps the kernel's default value only."""
    if not kernel.pattern_params:
        return None, [None]
    key = kernel.pattern_params[0]
    if quick:
        base = kernel.default_config(layer, sparsity) or {}
        return key, [base.get(key, kernel.space[key][0])]
    return key, list(kernel.space[key])


def _configured(kernel, layer, sparsity, fixed, dtype):
    """(config, reason or None) for a kernel with some parameters fixed."""
    cfg = kernel.full_config(layer, sparsity, fixed)
    if isinstance(cfg, str):  # no configuration at all: the reason
        return fixed, cfg
    return cfg, kernel.supports(layer, sparsity, cfg, dtype)


def build(layers, sparsities, kernel_names, batch, dtype, device, threads, quick=False,
          patterns=None) -> list[Case]:
    """Per layer: the dense baseline cases (one per layout), then the other dense kernels at
    their default configuration, then every sparse case (unsupported ones with their
    reason)."""
    device = Device(device)
    out = []
    base = baseline.kernel_for(device)
    chosen = [kernels.get(n) for n in kernel_names if n != base.name]
    dense = [k for k in chosen if k.pattern == "dense"]
    sparse = [k for k in chosen if k.pattern != "dense"]
    if patterns:
        sparse = [k for k in sparse if k.pattern in patterns]
    for layer in layers:
        for cfg in baseline.configs(base):
            why = base.supports(layer, 0.0, cfg, dtype)
            out.append(make_case(layer, base, 0.0, cfg, batch, dtype, device, threads,
                                 reason=why))
        for k in dense:
            cfg, why = _configured(k, layer, 0.0, {}, dtype)
            out.append(make_case(layer, k, 0.0, cfg, batch, dtype, device, threads, reason=why))
        for S in sparsities:
            for k in sparse:
                pkey, values = pattern_param_values(k, layer, S, quick)
                for v in values:
                    fixed = {pkey: v} if pkey else {}
                    cfg, why = _configured(k, layer, S, fixed, dtype)
                    out.append(make_case(layer, k, S, cfg, batch, dtype, device, threads,
                                         param=fixed, reason=why))
    return out
