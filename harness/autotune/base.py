"""The strategy interface: ``ask()`` the next candidate (None when it has nothing left), ``tell``
its cost (seconds; ``inf`` for a failed candidate). Candidates are hashable
:class:`harness.records.Candidate` values from a fixed list; a strategy never times anything
itself."""

from __future__ import annotations

import math

from ..records import Candidate


class BaseStrategy:
    name = "base"

    def __init__(self, candidates: list[Candidate], budget: int | None = None, seed: int = 0):
        if not candidates:
            raise ValueError("a strategy needs at least one candidate")
        self.candidates = [c if isinstance(c, Candidate) else Candidate(**c) for c in candidates]
        self.budget = len(candidates) if budget is None else max(1, min(budget, len(candidates)))
        self.seed = seed
        self.history: dict[Candidate, float] = {}

    def ask(self) -> Candidate | None:
        raise NotImplementedError

    def tell(self, cand: Candidate, cost: float) -> None:
        self.history[cand] = cost if cost == cost else math.inf

    @property
    def evaluations(self) -> int:
        return len(self.history)

    def best(self) -> tuple[Candidate | None, float]:
        if not self.history:
            return None, math.inf
        k = min(self.history, key=self.history.get)
        return k, self.history[k]
