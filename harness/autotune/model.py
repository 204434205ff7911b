"""Model-guided search with a cost model fitted on the measured cases.

After a seeded random start, each step fits a ridge regression of log(cost) on the candidates'
parameters (one-hot ``param=value`` features, plus their pairwise products once there are
enough samples, so interactions such as "tile size matters only when threads split over
pixels" are learned), with an optimism bonus for parameter values not yet measured. Steps
alternate between the unmeasured candidate with the lowest predicted cost anywhere and the
best-predicted unmeasured neighbour (one parameter changed) of the best candidate so far.
Failed candidates count as slower than the slowest measured one.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np

from .base import BaseStrategy


def features(candidates: list) -> tuple[np.ndarray, int, int]:
    """(design matrix, end of main-effect columns, end of one-hot columns): intercept, one-hot
    ``param=value`` columns, numeric columns, then pairwise products of the main effects."""
    tokens = sorted({f"kernel={c.kernel}" for c in candidates} |
                    {f"{c.kernel}.{k}={json.dumps(v)}" for c in candidates
                     for k, v in c.config.items()})
    index = {t: i for i, t in enumerate(tokens)}
    one = np.zeros((len(candidates), len(tokens)))
    for r, c in enumerate(candidates):
        one[r, index[f"kernel={c.kernel}"]] = 1
        for k, v in c.config.items():
            one[r, index[f"{c.kernel}.{k}={json.dumps(v)}"]] = 1
    # ordered parameters (tile sizes, block sizes, M, ...) also enter as standardized value and
    # value squared, so the model can extrapolate along them
    numeric = sorted({(c.kernel, k) for c in candidates for k, v in c.config.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)})
    num = np.zeros((len(candidates), 2 * len(numeric)))
    for j, (kern, k) in enumerate(numeric):
        vals = np.array([float(c.config[k]) if c.kernel == kern else np.nan
                         for c in candidates])
        mu, sd = np.nanmean(vals), np.nanstd(vals) or 1.0
        z = np.nan_to_num((vals - mu) / sd)
        num[:, 2 * j], num[:, 2 * j + 1] = z, z * z
    one = one[:, one.std(0) > 0]  # drop constant columns
    n_onehot = one.shape[1]
    one = np.hstack([one, num[:, num.std(0) > 0]])
    n = one.shape[1]
    iu = np.triu_indices(n, 1)
    pairs = (one[:, :, None] * one[:, None, :])[:, iu[0], iu[1]]
    pairs = pairs[:, pairs.std(0) > 0] if pairs.size else pairs
    return np.hstack([np.ones((len(candidates), 1)), one, pairs]), 1 + n, 1 + n_onehot


class Strategy(BaseStrategy):
    name = "model"
    RIDGE = 1.0
    EXPLORE = 0.15  # log-cost bonus per parameter value not yet measured (optimism)

    def __init__(self, candidates, budget=None, seed=0):
        super().__init__(candidates, budget, seed)
        self.X, self.n_main, self.n_onehot = features(self.candidates)
        self.keys = list(self.candidates)
        self.order = list(range(len(self.candidates)))
        random.Random(seed).shuffle(self.order)
        self.start = max(4, min(self.budget // 3, len(self.candidates)))

    def _fit_predict(self, done):
        y = np.array([self.history[self.keys[i]] for i in done])
        finite = y[np.isfinite(y)]
        worst = math.log(finite.max()) + 1.0 if len(finite) else 0.0
        y = np.where(np.isfinite(y), np.log(np.where(y > 0, y, 1e-12)), worst)
        # interactions only once there are clearly more samples than main effects
        cols = self.X.shape[1] if len(done) >= 2 * self.n_main else self.n_main
        X = self.X[:, :cols]
        A = X[done].T @ X[done] + self.RIDGE * np.eye(cols)
        A[0, 0] -= self.RIDGE  # no penalty on the intercept
        w = np.linalg.solve(A, X[done].T @ y)
        oh = self.X[:, 1:self.n_onehot]
        unseen = (oh * (oh[done].sum(0) == 0)).sum(1)
        return X @ w - self.EXPLORE * unseen

    def ask(self):
        if self.evaluations >= self.budget:
            return None
        todo = [i for i in range(len(self.candidates)) if self.keys[i] not in self.history]
        if not todo:
            return None
        if self.evaluations < self.start:
            return self.candidates[next(i for i in self.order if self.keys[i] not in self.history)]
        done = [i for i in range(len(self.candidates)) if self.keys[i] in self.history]
        pred = self._fit_predict(done)
        if (self.evaluations - self.start) % 2:  # refine: a neighbour of the incumbent
            best = min(done, key=lambda i: self.history[self.keys[i]])
            near = [i for i in todo if self._neighbours(best, i)]
            if near:
                return self.candidates[min(near, key=lambda i: pred[i])]
        return self.candidates[min(todo, key=lambda i: pred[i])]

    def _neighbours(self, a: int, b: int) -> bool:
        """Same kernel, exactly one parameter different."""
        ca, cb = self.candidates[a], self.candidates[b]
        if ca.kernel != cb.kernel:
            return False
        return sum(ca.config.get(k) != v for k, v in cb.config.items()) == 1
