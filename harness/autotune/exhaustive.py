"""Every candidate once, in order."""

from .base import BaseStrategy


class Strategy(BaseStrategy):
    name = "exhaustive"

    def __init__(self, candidates, budget=None, seed=0):
        super().__init__(candidates, None, seed)  # exhaustive ignores the budget
        self._next = 0

    def ask(self):
        if self._next >= len(self.candidates):
            return None
        self._next += 1
        return self.candidates[self._next - 1]
