"""Uniform random sampling without replacement, up to the budget."""

import random

from .base import BaseStrategy


class Strategy(BaseStrategy):
    name = "random"

    def __init__(self, candidates, budget=None, seed=0):
        super().__init__(candidates, budget, seed)
        self._order = list(range(len(self.candidates)))
        random.Random(seed).shuffle(self._order)

    def ask(self):
        if self.evaluations >= self.budget or not self._order:
            return None
        return self.candidates[self._order.pop()]
