"""Deployable plans: for a net x pattern x sparsity x device, the kernel and configuration each
layer should use, with measured times and the machine fingerprint. ``load`` validates."""

from __future__ import annotations

import json
from pathlib import Path

import kernels

SCHEMA = 2  # 2: identity (machine + software) and per-layer kernel source hashes
LAYER_FIELDS = {"layer": str, "index": int, "count": int, "shape": str, "kernel": str,
                "config": dict, "time_s": float, "dense_s": float, "speedup": float}
TOP_FIELDS = {"schema": int, "net": str, "pattern": str, "sparsity": float, "device": str,
              "batch": int, "dtype": str, "threads": int, "strategy": str,
              "fingerprint": dict, "identity": str, "machine_hash": str, "layers": list,
              "network_speedup": float}


class PlanError(ValueError):
    pass


def validate(plan: dict, check_kernels: bool = True) -> dict:
    if not isinstance(plan, dict):
        raise PlanError(f"a plan is a JSON object, got {type(plan).__name__}")
    for k, t in TOP_FIELDS.items():
        if k not in plan:
            raise PlanError(f"plan is missing {k!r}")
        if not isinstance(plan[k], t) and not (t is float and isinstance(plan[k], int)):
            raise PlanError(f"plan field {k!r} must be {t.__name__}, got {plan[k]!r:.60}")
    if plan["schema"] != SCHEMA:
        raise PlanError(f"plan schema {plan['schema']} is not supported (expected {SCHEMA})")
    if not plan["layers"]:
        raise PlanError("plan has no layers")
    for i, lay in enumerate(plan["layers"]):
        for k, t in LAYER_FIELDS.items():
            if k not in lay:
                raise PlanError(f"plan layer {i} is missing {k!r}")
            if not isinstance(lay[k], t) and not (t is float and isinstance(lay[k], int)):
                raise PlanError(f"plan layer {i} field {k!r} must be {t.__name__}")
        if lay["time_s"] <= 0 or lay["dense_s"] <= 0:
            raise PlanError(f"plan layer {i} ({lay['layer']}) has non-positive times")
        if check_kernels:
            try:
                kern = kernels.get(lay["kernel"])
            except ValueError as e:
                raise PlanError(f"plan layer {i}: {e}") from None
            why = kern._check_config({k: v for k, v in lay["config"].items()})
            if why:
                raise PlanError(f"plan layer {i} ({lay['layer']}): {why}")
    total_d = sum(lay["count"] * lay["dense_s"] for lay in plan["layers"])
    total_t = sum(lay["count"] * lay["time_s"] for lay in plan["layers"])
    if abs(total_d / total_t - plan["network_speedup"]) > 1e-6 * plan["network_speedup"] + 1e-9:
        raise PlanError("plan network_speedup does not match its layers")
    return plan


def save(plan: dict, path: str | Path) -> Path:
    validate(plan)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=1, sort_keys=True))
    return path


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        plan = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"no plan at {path}") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"{path} is not JSON: {e}") from None
    return validate(plan)
