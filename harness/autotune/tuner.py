"""Per-layer tuning: measure the dense baseline and each kernel's default, then let a strategy
choose candidates within its budget. Every measurement goes through the harness worker (the
float64 correctness gate, typed failures, time limits) and into the tuning table, keyed by the
machine, the kernel and its source hash, the layer shape, batch, dtype, threads, pattern,
sparsity and configuration; a later run reuses a record whose key matches and refuses (says so
and re-measures) one measured on another machine or with other kernel source."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field

import kernels

from .. import baseline, cases
from ..measure import PLAUSIBLE
from ..records import (
    Candidate,
    CaseRequest,
    Config,
    DenseRef,
    RaceReply,
    RaceRequest,
    TimingOptions,
    TuningRecord,
)
from ..runner import WorkerDied, WorkerTimeout, run_case
from . import strategy as get_strategy

TIMING = TimingOptions(rounds=5, min_sample=1e-3, warmup=0.02, resident=False)
RACE = TimingOptions(rounds=25, min_sample=2e-3, warmup=0.05)
CONFIRM_TOP = 3  # a single timing can be a lucky outlier: the top picks race each other
# a kernel replaces dense only where it beat dense in this share of the race's interleaved
# rounds: a median that is faster by a hair is a coin flip, and a plan must not be slower than
# dense when re-measured
WIN_RATE = 0.75


def candidates(layer, patterns, sparsity, device, dtype, skip=()) -> list[Candidate]:
    """Every supported configuration of every kernel of the patterns (``skip``: kernels left
    out, e.g. because they failed to build)."""
    out = []
    for name in kernels.names(device=device.kernel_device):
        k = kernels.get(name)
        if k.pattern in patterns and k.available() is None and name not in skip:
            out += [Candidate(name, Config(cfg)) for cfg in k.configs(layer, sparsity, dtype)]
    return out


@dataclass
class LayerResult:
    layer: object
    dense_s: float
    dense_layout: str
    best: Candidate
    best_s: float
    defaults: dict = field(default_factory=dict)  # kernel -> normalized seconds
    evaluations: int = 0
    measured: int = 0
    candidates: int = 0
    history: dict = field(default_factory=dict)


def shape_key(layer, threads: int) -> str:
    """The tuning table's ``shape`` column: which records belong to a layer shape."""
    return json.dumps({"shape": list(layer.shape_key), "threads": threads})


class Evaluator:
    """Costs of candidates on one layer: from the tuning table when a record with the same
    identity (machine and software, kernel source, shape, batch, dtype, threads, pattern,
    sparsity, config) exists, else measured through the worker (with the correctness gate)."""

    def __init__(self, store, worker, identity, layer, sparsity, batch, dtype, device, threads,
                 case_timeout=120.0, log=print, timing=None):
        self.store, self.worker, self.identity = store, worker, identity
        self.layer, self.S, self.batch, self.dtype = layer, sparsity, batch, dtype
        self.device, self.threads, self.timeout, self.log = device, threads, case_timeout, log
        self.timing = timing or TIMING
        self.base = baseline.kernel_for(device)
        self.dense_s = None
        self.dense_layout = None
        self.measured = 0  # new candidate measurements (each also stored in the tuning table)
        self.raced = 0  # confirmation timings of already-measured candidates
        self.flagged = 0  # race candidates not taken: above the FLOP ideal, or contended
        self._warned = set()

    def dense_candidate(self, layout=None) -> Candidate:
        return Candidate(self.base.name, Config({baseline.LAYOUT: layout or self.dense_layout}))

    def _case(self, kern, config, S):
        return cases.make_case(self.layer, kern, S, config, self.batch, self.dtype, self.device,
                               self.threads)

    def _key(self, case):
        """Identity of a tuning record: machine and software, kernel and its source, the
        layer's shape (records are shared by layers of one shape), batch, dtype, device,
        threads, pattern, sparsity and configuration."""
        ident = {"identity": self.identity, "kernel": case.kernel, "source": case.source_hash,
                 "shape": list(self.layer.shape_key), "batch": self.batch, "dtype": self.dtype,
                 "device": case.device.value, "threads": self.threads, "pattern": case.pattern,
                 "sparsity": case.sparsity, "config": dict(case.config),
                 **({"cudnn": case.cudnn} if case.cudnn is not None else {})}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]

    def _shape(self):
        return shape_key(self.layer, self.threads)

    def _lookup(self, case):
        key = self._key(case)
        found = self.store.latest_tuning(key)
        if found is not None:
            return key, found
        if case.kernel not in self._warned:  # records of the same case under another identity?
            old = self.store.tuned_elsewhere(case.kernel, self._shape(), case.sparsity,
                                             self.batch, self.dtype)
            if old and (old.identity != self.identity or old.source_hash != case.source_hash):
                why = "another machine or software" if old.identity != self.identity else \
                    "another version of the kernel's source"
                self.log(f"  tuning records for {case.kernel} on {self.layer.name} were measured "
                         f"with {why}; not reused, measuring again")
                self._warned.add(case.kernel)
        return key, None

    def cost(self, cand: Candidate) -> float:
        """Seconds, normalized to this layer's dense time through the interleaved dense run."""
        kern = kernels.get(cand.kernel)
        S = 0.0 if kern.pattern == "dense" else self.S
        case = self._case(kern, cand.config, S)
        key, row = self._lookup(case)
        if row is None:
            dense = None
            if not case.is_dense and self.dense_layout is not None:
                dense = DenseRef(self.base.name, self.dense_layout, self.dense_layout,
                                 self.dense_s if self.dense_s != math.inf else None)
            res = run_case(self.worker, CaseRequest(case, self.timing, dense), self.timeout)
            self.measured += 1
            row = TuningRecord(
                tune_key=key, identity=self.identity, kernel=kern.name,
                source_hash=case.source_hash, shape=self._shape(), batch=self.batch,
                dtype=self.dtype, pattern=kern.pattern, sparsity=S, config=dict(cand.config),
                status=res.status.value, median_s=res.median_s,
                dense_median_s=res.dense_median_s, rel_err=res.rel_err,
                flagged=res.implausible or ("contended by other work" if res.contended
                                            else None))
            self.store.add_tuning(row)
        med, dm = row.seconds, row.dense_median_s
        if med is None or row.flagged:  # a timing not to be taken at face value: not chosen
            return math.inf
        if kern.pattern != "dense" and dm and dm == dm and self.dense_s:
            return self.dense_s * med / float(dm)
        return med

    def race(self, cands: list[Candidate]) -> tuple[list[float], list]:
        """Seconds per candidate, measured interleaved in one worker call (inf on failure), and
        each one's share of the rounds in which it was faster than the first (None: unknown).
        The checks the sweep applies hold here too: a race contended by other work, or in
        which a candidate beats the first (dense) by more than ``PLAUSIBLE`` times the FLOP
        ideal, is run once more; a candidate still above the ideal, or every candidate of a
        race still contended, comes back as inf (never chosen), counted in ``flagged``."""
        unknown = [None] * len(cands)
        for _ in range(2):
            res = self._race_once(cands)
            if res is None:
                return [math.inf] * len(cands), unknown
            times = [m if m is not None else math.inf for m in res.medians] or \
                [math.inf] * len(cands)
            high = [i for i in range(1, len(times))
                    if times[i] > 0 and times[0] / times[i] > PLAUSIBLE / (1 - self.S)]
            if not res.contended and not high:
                break
        if res.contended:
            self.flagged += 1
            self.log(f"  {self.layer.name}: the confirmation race stayed contended by other "
                     f"work; no candidate is taken from it")
            return [math.inf] * len(cands), unknown
        for i in high:
            self.flagged += 1
            self.log(f"  {self.layer.name}: {cands[i].kernel} raced {times[0] / times[i]:.2f}x "
                     f"dense, above the FLOP ideal {1 / (1 - self.S):.2f}x twice: not taken")
            times[i] = math.inf
        return times, list(res.win_rates) or unknown

    def _race_once(self, cands) -> RaceReply | None:
        req = RaceRequest(layer=self.layer, batch=self.batch, dtype=self.dtype,
                          device=self.device, threads=self.threads, sparsity=self.S,
                          cands=tuple(cands), timing=RACE)
        try:
            res = self.worker.call(req, self.timeout * 2)
        except (WorkerTimeout, WorkerDied):
            return None
        if not isinstance(res, RaceReply):
            return None
        self.raced += len(cands)
        return res

    def dense(self):
        """The layer's dense baseline time and layout (the faster layout, measured)."""
        best = (math.inf, None)
        for cfg in baseline.configs(self.base):
            c = self.cost(Candidate(self.base.name, cfg))
            best = min(best, (c, cfg[baseline.LAYOUT]), key=lambda t: t[0])
        self.dense_s, self.dense_layout = best
        if self.dense_layout is None:
            self.dense_layout = baseline.configs(self.base)[0][baseline.LAYOUT]
        return self.dense_s, self.dense_layout


def confirm(ev: Evaluator, history: dict, dense_s: float, layout: str):
    """(best candidate, its cost): the top picks of a screen (``history``: candidate -> cost)
    race each other and dense interleaved; a kernel replaces dense only where it is faster in
    the race's median and in at least ``WIN_RATE`` of its rounds (dense is always a
    candidate)."""
    best, best_s = ev.dense_candidate(layout), dense_s
    top = sorted(history, key=history.get)[:CONFIRM_TOP]
    top = [c for c in top if math.isfinite(history[c])]
    if top:
        times, wins = ev.race([ev.dense_candidate(layout)] + top)
        if math.isfinite(times[0]):
            i = min(range(len(top)), key=lambda j: times[j + 1])
            if math.isfinite(times[i + 1]):
                cost = dense_s * times[i + 1] / times[0]
                clear = wins[i + 1] is None or wins[i + 1] >= WIN_RATE
                if cost < best_s and clear:
                    best, best_s = top[i], cost
    return best, best_s


def tune_layer(ev: Evaluator, patterns, strategy_name, budget=None, seed=0, deadline=None,
               skip=()):
    cands = candidates(ev.layer, patterns, ev.S, ev.device, ev.dtype, skip)
    dense_s, layout = ev.dense()
    defaults = {}
    for name in sorted({c.kernel for c in cands}):
        cfg = kernels.get(name).default_config(ev.layer, ev.S)
        if cfg and Candidate(name, Config(cfg)) in set(cands):
            defaults[name] = ev.cost(Candidate(name, Config(cfg)))
    best, best_s = ev.dense_candidate(layout), dense_s
    strat = None
    if cands:
        if budget is None and strategy_name != "exhaustive":
            budget = max(1, math.ceil(0.25 * len(cands)))
        strat = get_strategy(strategy_name)(cands, budget, seed)
        while (cand := strat.ask()) is not None:
            if deadline is not None and time.monotonic() > deadline and strat.evaluations:
                break
            strat.tell(cand, ev.cost(cand))
        best, best_s = confirm(ev, strat.history, dense_s, layout)
    return LayerResult(layer=ev.layer, dense_s=dense_s, dense_layout=layout, best=best,
                       best_s=best_s, defaults=defaults,
                       evaluations=strat.evaluations if strat else 0, measured=ev.measured,
                       candidates=len(cands), history=dict(strat.history) if strat else {})


@dataclass(frozen=True)
class TuneJob:
    """One layer to tune, as the autotune driver sends it to a node: ``seconds`` is the layer's
    share of ``--time-budget`` (None: no limit); ``compare`` names strategies to run too and
    race against exhaustive's pick (which then replaces ``strategy``)."""

    layer: object
    patterns: tuple
    sparsity: float
    batch: int
    dtype: str
    device: object
    threads: int
    strategy: str
    budget: int | None = None
    seed: int = 0
    seconds: float | None = None
    compare: tuple = ()

    def run(self, evaluator, skip=()):
        """``(LayerResult, races, comparison rows)``; ``evaluator(quiet=False)`` makes a fresh
        ``Evaluator`` of this layer on the node."""
        deadline = None if self.seconds is None else time.monotonic() + self.seconds
        ev = evaluator()
        base = "exhaustive" if self.compare else self.strategy
        r = tune_layer(ev, self.patterns, base, self.budget, self.seed, deadline, skip=skip)
        rows = []
        if self.compare:  # regret from one interleaved race of the confirmed picks
            picks, evals = {"exhaustive": r.best}, {}
            for name in self.compare:
                r2 = tune_layer(evaluator(quiet=True), self.patterns, name, self.budget,
                                self.seed, skip=skip)
                picks[name], evals[name] = r2.best, r2.evaluations
            names = list(picks)
            times = dict(zip(names, ev.race([picks[n] for n in names])[0]))
            for name in self.compare:
                rows.append({
                    "layer": self.layer.name, "strategy": name, "evals": evals[name],
                    "exhaustive evals": r.evaluations,
                    "fraction": evals[name] / max(1, r.evaluations),
                    "pick": picks[name].label(), "same pick": picks[name] == picks["exhaustive"],
                    "pick ms": times[name] * 1e3, "exhaustive pick ms": times["exhaustive"] * 1e3,
                    "regret %": 100 * (times[name] / times["exhaustive"] - 1)})
        return r, ev.raced, rows


@dataclass(frozen=True)
class TuneOutcome:
    """What a node sends back for one ``TuneJob``: the result, the tuning records it measured
    (the driver stores them), its race count, the comparison rows, the kernels left out because
    they did not build (name -> reason) and the tuner's notes."""

    result: LayerResult
    records: tuple
    raced: int
    compared: tuple = ()
    broken: dict = field(default_factory=dict)
    notes: tuple = ()


__all__ = ["tune_layer", "confirm", "candidates", "Evaluator", "LayerResult", "shape_key",
           "TuneJob", "TuneOutcome"]
