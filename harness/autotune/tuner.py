"""Per-layer tuning: measure the dense baseline and each kernel's default, then let a strategy
choose candidates within its budget. Every measurement goes through the harness worker (the
float64 correctness gate, typed failures, time limits) and into the tuning table, keyed by the
machine, the kernel and its source hash, the layer shape, batch, dtype, threads, pattern,
sparsity and configuration; a later run reuses a record whose key matches and refuses (says so
and re-measures) one measured on another machine or with other kernel source."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field

import kernels

from .. import cases
from ..runner import WorkerDied, WorkerTimeout
from . import strategy as get_strategy
from .base import cand_key

TIMING = {"rounds": 5, "min_sample": 1e-3, "warmup": 0.02, "resident": False}
RACE = {"rounds": 25, "min_sample": 2e-3, "warmup": 0.05}
CONFIRM_TOP = 3  # a single timing can be a lucky outlier: the top picks race each other


def candidates(layer, patterns, sparsity, device, dtype):
    out = []
    for name in kernels.names(device=device):
        k = kernels.get(name)
        if k.pattern in patterns and k.available() is None:
            out += [{"kernel": name, "config": cfg} for cfg in k.configs(layer, sparsity, dtype)]
    return out


@dataclass
class LayerResult:
    layer: object
    dense_s: float
    dense_layout: str
    best: dict
    best_s: float
    defaults: dict = field(default_factory=dict)  # kernel -> normalized seconds
    evaluations: int = 0
    measured: int = 0
    candidates: int = 0
    history: dict = field(default_factory=dict)


class Evaluator:
    def __init__(self, store, worker, machine_hash, layer, sparsity, batch, dtype, device, threads,
                 case_timeout=120.0, log=print, timing=None):
        self.store, self.worker, self.mh = store, worker, machine_hash
        self.layer, self.S, self.batch, self.dtype = layer, sparsity, batch, dtype
        self.device, self.threads, self.timeout, self.log = device, threads, case_timeout, log
        self.timing = timing or TIMING
        self.dense_s = None
        self.dense_layout = "nchw"
        self.dense_kernel = next(n for n in kernels.names(device=device) if kernels.get(n).baseline)
        self.measured = 0  # new candidate measurements (each also stored in the tuning table)
        self.raced = 0  # confirmation timings of already-measured candidates
        self._warned = set()

    def _key(self, kern, config, S):
        ident = {"machine": self.mh, "kernel": kern.name, "source": kern.source_hash(),
                 "shape": self._shape(), "batch": self.batch, "dtype": self.dtype,
                 "pattern": kern.pattern, "sparsity": S, "config": config}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]

    def _shape(self):
        return json.dumps({"shape": list(self.layer.shape_key), "threads": self.threads})

    def _lookup(self, kern, config, S):
        key = self._key(kern, config, S)
        t = self.store.tuning(key)
        if len(t):
            return key, t.iloc[-1]
        if kern.name not in self._warned:  # records of the same case under another key?
            old = self.store.db.execute(
                "SELECT machine_hash, source_hash FROM tuning WHERE kernel = ? AND shape = ? AND "
                "sparsity = ? AND batch = ? AND dtype = ? LIMIT 1",
                (kern.name, self._shape(), S, self.batch, self.dtype)).fetchone()
            if old and (old[0] != self.mh or old[1] != kern.source_hash()):
                why = "another machine or torch/triton" if old[0] != self.mh else \
                    "another version of the kernel's source"
                self.log(f"  tuning records for {kern.name} on {self.layer.name} were measured "
                         f"with {why}; not reused, measuring again")
                self._warned.add(kern.name)
        return key, None

    def _measure(self, kern, config, S):
        case = cases.make_case(self.layer, kern, S, config, self.batch, self.dtype, self.device,
                               self.threads)
        if kern.pattern != "dense" and self.dense_s is not None:
            case.update(dense_kernel=self.dense_kernel, dense_layout=self.dense_layout)
        try:
            res = self.worker.call(("case", case, self.timing), self.timeout)
        except WorkerTimeout as e:
            res = {"status": "timeout", "reason": str(e)}
        except WorkerDied as e:
            res = {"status": "runtime_error", "reason": str(e)}
        self.measured += 1
        return res

    def cost(self, cand) -> float:
        """Seconds, normalized to this layer's dense time through the interleaved dense run."""
        kern = kernels.get(cand["kernel"])
        S = 0.0 if kern.pattern == "dense" else self.S
        key, row = self._lookup(kern, cand["config"], S)
        if row is None:
            res = self._measure(kern, cand["config"], S)
            row = {"tune_key": key, "machine_hash": self.mh, "kernel": kern.name,
                   "source_hash": kern.source_hash(), "shape": self._shape(),
                   "batch": self.batch, "dtype": self.dtype, "pattern": kern.pattern,
                   "sparsity": S, "config": cand["config"], "status": res.get("status"),
                   "median_s": res.get("median_s"), "dense_median_s": res.get("dense_median_s"),
                   "rel_err": res.get("rel_err")}
            self.store.add_tuning(row)
        if row["status"] != "ok" or row["median_s"] is None or row["median_s"] != row["median_s"]:
            return math.inf
        med, dm = float(row["median_s"]), row["dense_median_s"]
        if kern.pattern != "dense" and dm and dm == dm and self.dense_s:
            return self.dense_s * med / float(dm)
        return med

    def race(self, cands: list[dict]) -> list[float]:
        """Seconds per candidate, measured interleaved in one worker call (inf on failure)."""
        spec = {"layer": dataclasses.asdict(self.layer), "batch": self.batch, "dtype": self.dtype,
                "device": self.device, "threads": self.threads,
                "cands": [{**c, "sparsity": 0.0 if kernels.get(c["kernel"]).pattern == "dense"
                           else self.S} for c in cands]}
        try:
            res = self.worker.call(("race", spec, RACE), self.timeout * 2)
        except (WorkerTimeout, WorkerDied):
            return [math.inf] * len(cands)
        self.raced += len(cands)
        return [m if m is not None else math.inf for m in res.get("medians", [])] or \
            [math.inf] * len(cands)

    def dense(self):
        k = kernels.get(self.dense_kernel)
        best = (math.inf, "nchw")
        for layout in k.space["layout"]:
            c = self.cost({"kernel": k.name, "config": {"layout": layout}})
            best = min(best, (c, layout))
        self.dense_s, self.dense_layout = best
        return best


def tune_layer(ev: Evaluator, patterns, strategy_name, budget=None, seed=0, deadline=None):
    cands = candidates(ev.layer, patterns, ev.S, ev.device, ev.dtype)
    dense_s, layout = ev.dense()
    defaults = {}
    for name in sorted({c["kernel"] for c in cands}):
        cfg = kernels.get(name).default_config(ev.layer, ev.S)
        if cfg and any(c["kernel"] == name and c["config"] == cfg for c in cands):
            defaults[name] = ev.cost({"kernel": name, "config": cfg})
    best, best_s = {"kernel": ev.dense_kernel, "config": {"layout": layout}}, dense_s
    strat = None
    if cands:
        if budget is None and strategy_name != "exhaustive":
            budget = max(1, math.ceil(0.25 * len(cands)))
        strat = get_strategy(strategy_name)(cands, budget, seed)
        while (cand := strat.ask()) is not None:
            if deadline is not None and time.monotonic() > deadline and strat.evaluations:
                break
            strat.tell(cand, ev.cost(cand))
        top = sorted(strat.history, key=strat.history.get)[:CONFIRM_TOP]
        top = [json.loads(k) for k in top if math.isfinite(strat.history[k])]
        if top:  # confirm: the top picks and dense race each other interleaved
            dense_c = {"kernel": ev.dense_kernel, "config": {"layout": layout}}
            times = ev.race([dense_c] + top)
            if math.isfinite(times[0]):
                i = min(range(len(top)), key=lambda j: times[j + 1])
                if math.isfinite(times[i + 1]):
                    cost = dense_s * times[i + 1] / times[0]
                    if cost < best_s:  # dense is always a candidate
                        best, best_s = top[i], cost
    return LayerResult(layer=ev.layer, dense_s=dense_s, dense_layout=layout, best=best,
                       best_s=best_s, defaults=defaults,
                       evaluations=strat.evaluations if strat else 0, measured=ev.measured,
                       candidates=len(cands), history=dict(strat.history) if strat else {})


__all__ = ["tune_layer", "candidates", "Evaluator", "LayerResult", "cand_key"]
