"""Model-guided search with a library: optuna's TPE sampler over the candidates' parameters (the kernel first,
then that kernel's parameters, define-by-run). A proposal that is not a valid candidate is
pruned without spending budget; one already measured is answered from memory."""

from __future__ import annotations

import json
import math
from collections import defaultdict

from ..records import Candidate
from .base import BaseStrategy


class Strategy(BaseStrategy):
    name = "tpe"
    MAX_TRIES = 200  # invalid or repeated proposals tolerated before falling back to random

    def __init__(self, candidates, budget=None, seed=0):
        super().__init__(candidates, budget, seed)
        import warnings

        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self._optuna = optuna
        self.valid = set(self.candidates)
        self.kernels = sorted({c.kernel for c in self.candidates})
        self.values = defaultdict(set)  # (kernel, param) -> values seen in valid candidates
        for c in self.candidates:
            for p, v in c.config.items():
                self.values[(c.kernel, p)].add(json.dumps(v))
        startup = max(3, min(10, self.budget // 3))
        self.study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=startup, multivariate=True, group=True))
        self._trials: dict[Candidate, object] = {}
        self._fallback = list(self.candidates)

    def _propose(self, trial) -> Candidate:
        kernel = trial.suggest_categorical("kernel", self.kernels)
        params = sorted(p for (k, p) in self.values if k == kernel)
        cfg = {p: json.loads(trial.suggest_categorical(
            f"{kernel}.{p}", sorted(self.values[(kernel, p)]))) for p in params}
        return Candidate(kernel, cfg)

    def ask(self):
        if self.evaluations >= self.budget or len(self.history) >= len(self.valid):
            return None
        TrialState = self._optuna.trial.TrialState
        for _ in range(self.MAX_TRIES):
            trial = self.study.ask()
            key = self._propose(trial)
            if key not in self.valid:
                self.study.tell(trial, state=TrialState.PRUNED)
            elif key in self.history:
                cost = self.history[key]
                self.study.tell(trial, cost if math.isfinite(cost) else 1e30)
            else:
                self._trials[key] = trial
                return key
        for key in self._fallback:  # TPE keeps proposing known points: take an unmeasured one
            if key not in self.history:
                return key
        return None

    def tell(self, cand, cost):
        super().tell(cand, cost)
        trial = self._trials.pop(cand, None)
        if trial is not None:
            self.study.tell(trial, cost if math.isfinite(cost) else 1e30)
