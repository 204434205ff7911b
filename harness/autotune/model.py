"""Model-guided search with a cost model fitted on the measured cases.

After a seeded random start, each step fits a ridge regression of log(cost) on the candidates'
parameters (one-hot ``param=value`` features plus their pairwise products, so interactions such
as "tile size matters only when threads split over pixels" are learned) and measures the
unmeasured candidate with the lowest predicted cost. Failed candidates count as slower than the
slowest measured one.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np

from .base import BaseStrategy, cand_key


def features(candidates: list[dict]) -> np.ndarray:
    tokens = sorted({f"kernel={c['kernel']}" for c in candidates} |
                    {f"{c['kernel']}.{k}={json.dumps(v)}" for c in candidates
                     for k, v in c["config"].items()})
    index = {t: i for i, t in enumerate(tokens)}
    one = np.zeros((len(candidates), len(tokens)))
    for r, c in enumerate(candidates):
        one[r, index[f"kernel={c['kernel']}"]] = 1
        for k, v in c["config"].items():
            one[r, index[f"{c['kernel']}.{k}={json.dumps(v)}"]] = 1
    one = one[:, one.std(0) > 0]  # drop constant columns
    n = one.shape[1]
    iu = np.triu_indices(n, 1)
    pairs = (one[:, :, None] * one[:, None, :])[:, iu[0], iu[1]]
    pairs = pairs[:, pairs.std(0) > 0] if pairs.size else pairs
    return np.hstack([np.ones((len(candidates), 1)), one, pairs])


class Strategy(BaseStrategy):
    name = "model"
    RIDGE = 1.0

    def __init__(self, candidates, budget=None, seed=0):
        super().__init__(candidates, budget, seed)
        self.X = features(self.candidates)
        self.keys = [cand_key(c) for c in self.candidates]
        self.order = list(range(len(self.candidates)))
        random.Random(seed).shuffle(self.order)
        self.start = max(4, min(self.budget // 3, len(self.candidates)))

    def _fit_predict(self):
        done = [i for i, k in enumerate(self.keys) if k in self.history]
        y = np.array([self.history[self.keys[i]] for i in done])
        finite = y[np.isfinite(y)]
        worst = math.log(finite.max()) + 1.0 if len(finite) else 0.0
        y = np.where(np.isfinite(y), np.log(np.where(y > 0, y, 1e-12)), worst)
        X = self.X[done]
        A = X.T @ X + self.RIDGE * np.eye(X.shape[1])
        A[0, 0] -= self.RIDGE  # no penalty on the intercept
        w = np.linalg.solve(A, X.T @ y)
        return self.X @ w

    def ask(self):
        if self.evaluations >= self.budget:
            return None
        todo = [i for i in range(len(self.candidates)) if self.keys[i] not in self.history]
        if not todo:
            return None
        if self.evaluations < self.start:
            return self.candidates[next(i for i in self.order if self.keys[i] not in self.history)]
        pred = self._fit_predict()
        return self.candidates[min(todo, key=lambda i: pred[i])]
