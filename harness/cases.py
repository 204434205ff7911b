"""Sweep construction: layers x sparsities x kernels x pattern parameters -> cases.

A case is a plain dict (it crosses to the worker process): layer fields, batch, dtype, device,
threads, pattern, sparsity, kernel, full config, and ``key`` (canonical JSON identity used for
resume). Combinations a kernel cannot run are kept as cases with ``status='unsupported'`` and a
reason, never dropped.
"""

from __future__ import annotations

import dataclasses
import json

import kernels
import shapes

SPARSITIES = (0.5, 0.75, 0.875, 0.9375)
# the CS paper's mapped ResNet50 layers (see shared mapping rule): the quick set
QUICK_LAYERS = ("layer1.0.conv3", "layer2.0.conv2", "layer4.0.conv2")


def case_key(c: dict) -> str:
    lay = c["layer"]
    ident = {"net": lay["net"], "layer": lay["name"], "shape": [lay[k] for k in (
        "cin", "cout", "kh", "kw", "stride", "padding", "h", "w", "dilation", "groups")],
        "batch": c["batch"], "dtype": c["dtype"], "device": c["device"],
        "threads": c["threads"], "kernel": c["kernel"], "sparsity": c["sparsity"],
        "config": c["config"]}
    return json.dumps(ident, sort_keys=True, default=str)


def make_case(layer, kernel, sparsity, config, batch, dtype, device, threads, param=None,
              reason=None) -> dict:
    c = {"layer": dataclasses.asdict(layer), "batch": batch, "dtype": dtype, "device": device,
         "threads": threads, "pattern": kernel.pattern, "sparsity": sparsity,
         "kernel": kernel.name, "config": config, "param": param or {},
         "status": "unsupported" if reason else None, "reason": reason}
    c["key"] = case_key(c)
    return c


def select_layers(nets, layer_names=None, quick=False, shapes_csv=None):
    """Unique shapes of the chosen nets (each with its ``count``), optionally filtered."""
    layers = []
    for net in nets:
        uniq = shapes.unique(shapes.load(net))
        if quick and not layer_names:
            uniq = [u for u in uniq if u.name in QUICK_LAYERS] or uniq[:3]
        layers += uniq
    if shapes_csv:
        layers += shapes.unique(shapes.load_csv(shapes_csv))
    if layer_names:
        wanted = set(layer_names)
        found = {lay.name for lay in layers} | {str(lay.index) for lay in layers}
        missing = wanted - found
        if missing:
            raise ValueError(f"unknown layer(s) {sorted(missing)}; names look like "
                             f"{', '.join(sorted({lay.name for lay in layers})[:4])}, ...")
        layers = [lay for lay in layers if lay.name in wanted or str(lay.index) in wanted]
    return layers


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


def build(layers, sparsities, kernel_names, batch, dtype, device, threads, quick=False,
          patterns=None):
    """Per layer: the dense baseline cases, then every sparse case (unsupported ones with
    their reason)."""
    out = []
    dense = [kernels.get(n) for n in kernel_names if kernels.get(n).pattern == "dense"]
    sparse = [kernels.get(n) for n in kernel_names if kernels.get(n).pattern != "dense"]
    if patterns:
        sparse = [k for k in sparse if k.pattern in patterns]
    for layer in layers:
        for k in dense:
            for cfg in [{"layout": v} for v in k.space["layout"]]:
                why = k.supports(layer, 0.0, cfg, dtype)
                out.append(make_case(layer, k, 0.0, cfg, batch, dtype, device, threads,
                                     reason=why))
        for S in sparsities:
            for k in sparse:
                pkey, values = pattern_param_values(k, layer, S, quick)
                for v in values:
                    fixed = {pkey: v} if pkey else {}
                    cfg = k.full_config(layer, S, fixed)
                    if isinstance(cfg, str):  # no configuration at all: the reason
                        why, cfg = cfg, fixed
                    else:
                        why = k.supports(layer, S, cfg, dtype)
                    out.append(make_case(layer, k, S, cfg, batch, dtype, device, threads,
                                         param=fixed, reason=why))
    return out
