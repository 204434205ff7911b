"""Deployable plans: for a net x pattern x sparsity x device, the kernel and configuration each
layer should use, with measured times and the machine fingerprint. A plan is a typed
:class:`Plan` of :class:`PlanLayer` s; every refusal lives here: ``Plan.of`` (and so ``load``)
refuses a malformed plan, ``Plan.check`` one made for another net, pattern, sparsity, batch,
device, machine or kernel source."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import kernels

from .records import Device

SCHEMA = 2  # 2: identity (machine + software) and per-layer kernel source hashes
LAYER_FIELDS = {"layer": str, "index": int, "count": int, "shape": str, "kernel": str,
                "config": dict, "time_s": float, "dense_s": float, "speedup": float}
TOP_FIELDS = {"schema": int, "net": str, "pattern": str, "sparsity": float, "device": str,
              "batch": int, "dtype": str, "threads": int, "strategy": str,
              "fingerprint": dict, "identity": str, "machine_hash": str, "layers": list,
              "network_speedup": float}
DEVICES = [d.value for d in Device]


class PlanError(ValueError):
    pass


def _typed(value, t) -> bool:
    """JSON value of the declared type (an integer is a float; a bool is no number)."""
    if isinstance(value, bool):
        return t is bool
    return isinstance(value, t) or (t is float and isinstance(value, int))


def _positive(value) -> bool:
    return math.isfinite(value) and value > 0


def _check_top(plan: dict) -> None:
    for k, t in TOP_FIELDS.items():
        if k not in plan:
            raise PlanError(f"plan is missing {k!r}")
        if not _typed(plan[k], t):
            raise PlanError(f"plan field {k!r} must be {t.__name__}, got {plan[k]!r:.60}")
    if plan["schema"] != SCHEMA:
        raise PlanError(f"plan schema {plan['schema']} is not supported (expected {SCHEMA})")
    if plan["device"] not in DEVICES:
        raise PlanError(f"plan device {plan['device']!r:.40} is not one of {', '.join(DEVICES)}")
    if plan["dtype"] not in kernels.DTYPES:
        raise PlanError(f"plan dtype {plan['dtype']!r:.40} is not one of "
                        f"{', '.join(kernels.DTYPES)}")
    if not (math.isfinite(plan["sparsity"]) and 0 < plan["sparsity"] < 1):
        raise PlanError(f"plan sparsity {plan['sparsity']!r} is outside (0, 1)")
    for k in ("batch", "threads"):
        if plan[k] < 1:
            raise PlanError(f"plan {k} {plan[k]} must be >= 1")
    if not _positive(plan["network_speedup"]):
        raise PlanError(f"plan network_speedup {plan['network_speedup']!r} must be a positive "
                        f"number")
    if not plan["layers"]:
        raise PlanError("plan has no layers")


def _check_layer(i: int, lay, check_kernels: bool) -> None:
    if not isinstance(lay, dict):
        raise PlanError(f"plan layer {i} must be an object with {', '.join(LAYER_FIELDS)}; got "
                        f"{lay!r:.40}")
    for k, t in LAYER_FIELDS.items():
        if k not in lay:
            raise PlanError(f"plan layer {i} is missing {k!r}")
        if not _typed(lay[k], t):
            raise PlanError(f"plan layer {i} field {k!r} must be {t.__name__}, got "
                            f"{lay[k]!r:.40}")
    name = lay["layer"]
    if lay["count"] < 1 or lay["index"] < 0:
        raise PlanError(f"plan layer {i} ({name}): count {lay['count']} must be >= 1 and index "
                        f"{lay['index']} >= 0")
    for k in ("time_s", "dense_s", "speedup"):
        if not _positive(lay[k]):
            raise PlanError(f"plan layer {i} ({name}): {k} {lay[k]!r} must be a positive number")
    if check_kernels:
        try:
            kern = kernels.get(lay["kernel"])
        except ValueError as e:
            raise PlanError(f"plan layer {i}: {e}") from None
        why = kern._check_config({k: v for k, v in lay["config"].items()})
        if why:
            raise PlanError(f"plan layer {i} ({name}): {why}")


def validate(plan: dict, check_kernels: bool = True) -> dict:
    """The plan itself when every field has its type and a value that can be true (finite
    positive times, counts and threads, a sparsity in (0, 1), a known device and dtype);
    otherwise ``PlanError`` saying which field is wrong."""
    if not isinstance(plan, dict):
        raise PlanError(f"a plan is a JSON object, got {type(plan).__name__}")
    _check_top(plan)
    for i, lay in enumerate(plan["layers"]):
        _check_layer(i, lay, check_kernels)
    total_d = sum(lay["count"] * lay["dense_s"] for lay in plan["layers"])
    total_t = sum(lay["count"] * lay["time_s"] for lay in plan["layers"])
    if abs(total_d / total_t - plan["network_speedup"]) > 1e-6 * plan["network_speedup"] + 1e-9:
        raise PlanError("plan network_speedup does not match its layers")
    return plan


@dataclass(frozen=True)
class PlanLayer:
    """One layer shape of a plan: the kernel and configuration to run there, as tuned."""

    layer: str
    index: int
    count: int
    shape: str
    kernel: str
    config: dict
    time_s: float
    dense_s: float
    speedup: float
    source_hash: str | None = None  # the kernel's source when it was tuned
    default_time_s: float | None = None  # the kernels' default configurations' best time

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k in LAYER_FIELDS}


@dataclass(frozen=True)
class Plan:
    """A tuned plan (the JSON file ``autotune`` writes, ``e2e`` and ``table --plan`` read)."""

    net: str
    pattern: str
    sparsity: float
    device: str
    batch: int
    dtype: str
    threads: int
    strategy: str
    fingerprint: dict
    identity: str
    machine_hash: str
    network_speedup: float
    layers: tuple = ()
    default_network_speedup: float | None = None
    evaluations: int | None = None
    schema: int = SCHEMA
    extra: dict = field(default_factory=dict)  # fields a newer writer added, kept as read

    @classmethod
    def of(cls, plan: Plan | dict, check_kernels: bool = True) -> Plan:
        """A plan from its JSON object, validated (``PlanError`` says which field is wrong)."""
        if isinstance(plan, Plan):
            return plan
        validate(plan, check_kernels)
        names = {f.name for f in fields(cls)} - {"extra", "layers"}
        lay_names = {f.name for f in fields(PlanLayer)}
        layers = tuple(PlanLayer(**{k: v for k, v in lay.items() if k in lay_names})
                       for lay in plan["layers"])
        return cls(**{k: v for k, v in plan.items() if k in names}, layers=layers,
                   extra={k: v for k, v in plan.items() if k not in names | {"layers"}})

    def to_dict(self) -> dict:
        """The plan's JSON object (what ``save`` writes)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("extra", "layers") and getattr(self, f.name) is not None}
        return {**self.extra, **out, "layers": [lay.to_dict() for lay in self.layers]}

    @property
    def by_shape(self) -> dict:
        """Layer shape (``ConvLayer.shape_str``) -> its ``PlanLayer``."""
        return {lay.shape: lay for lay in self.layers}

    def check(self, net: str | None, pattern: str, sparsity: float, batch: int,
              identity: str | None, device: Device) -> None:
        """Refuse, with one sentence (``PlanError``), a plan made for something else: another
        net, pattern, sparsity, batch, device, machine or software (``identity``; None: not
        checked), or a kernel that is not registered here or whose source changed since."""
        def refuse(why):
            raise PlanError(f"plan refused: {why}")

        if net is not None and self.net != net:
            refuse(f"it was made for net {self.net!r}, not {net!r}")
        if self.pattern != pattern:
            refuse(f"it was made for pattern {self.pattern!r}, not {pattern!r}")
        if abs(float(self.sparsity) - sparsity) > 1e-9:
            refuse(f"it was made for sparsity {self.sparsity}, not {sparsity:g}")
        if self.batch != batch:
            refuse(f"it was made for batch {self.batch}, not {batch}")
        if self.device != Device(device).value:
            refuse(f"it was made for device {self.device}, not {device}")
        if identity is not None and self.identity != identity:
            refuse("it was tuned on another machine or software (identity "
                   f"{str(self.identity)[:8]}, this one {identity[:8]})")
        for lay in self.layers:
            if lay.kernel not in kernels.names():
                refuse(f"layer {lay.layer} uses kernel {lay.kernel!r}, not registered here")
            k = kernels.get(lay.kernel)
            if k.pattern != "dense" and lay.source_hash != k.source_hash():
                refuse(f"layer {lay.layer}: the source of {k.name} changed since the plan was "
                       f"tuned (source hash {str(lay.source_hash)[:8]}, now "
                       f"{k.source_hash()[:8]}); tune again")


def save(plan: Plan | dict, path: str | Path) -> Path:
    """Validate the plan and write it as JSON (its folder is made)."""
    data = plan.to_dict() if isinstance(plan, Plan) else plan
    validate(data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True))
    return path


def load(path: str | Path, check_kernels: bool = True) -> Plan:
    """The plan at ``path``; ``PlanError`` when there is none, it is not JSON or not valid."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"no plan at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"{path} is not JSON: {e}") from None
    except OSError as e:
        raise PlanError(f"cannot read {path}: {e.strerror}") from None
    return Plan.of(data, check_kernels)
