"""The strategy interface: ``ask()`` the next candidate (None when it has nothing left), ``tell``
its cost (seconds; ``inf`` for a failed candidate). Candidates are ``{"kernel", "config"}``
dicts from a fixed list; a strategy never times anything itself."""

from __future__ import annotations

import json
import math


def cand_key(c: dict) -> str:
    return json.dumps({"kernel": c["kernel"], "config": c["config"]}, sort_keys=True)


class BaseStrategy:
    name = "base"

    def __init__(self, candidates: list[dict], budget: int | None = None, seed: int = 0):
        if not candidates:
            raise ValueError("a strategy needs at least one candidate")
        self.candidates = list(candidates)
        self.budget = len(candidates) if budget is None else max(1, min(budget, len(candidates)))
        self.seed = seed
        self.history: dict[str, float] = {}

    def ask(self) -> dict | None:
        raise NotImplementedError

    def tell(self, cand: dict, cost: float) -> None:
        self.history[cand_key(cand)] = cost if cost == cost else math.inf

    @property
    def evaluations(self) -> int:
        return len(self.history)

    def best(self) -> tuple[dict | None, float]:
        if not self.history:
            return None, math.inf
        k = min(self.history, key=self.history.get)
        return json.loads(k), self.history[k]
