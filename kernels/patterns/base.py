"""Shared pieces of the sparsity patterns.

Weights are dense OIHW tensors ``[Cout, Cin, Kh, Kw]``. Unless a pattern says otherwise, a filter
row is flattened in OIHW order: column ``p = (c * Kh + r) * Kw + s``.
"""

from __future__ import annotations

import math

import torch

POW2_SPARSITIES = (0.5, 0.75, 0.875, 0.9375)


def check_sparsity(s) -> float:
    try:
        s = float(s)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity must be a number in (0, 1), got {s!r}") from None
    if not 0.0 < s < 1.0 or math.isnan(s):
        raise ValueError(f"sparsity {s} is outside (0, 1); e.g. 0.5, 0.75, 0.875, 0.9375")
    return s


def exact_int(x: float, what: str, valid: str) -> int:
    n = round(x)
    if abs(x - n) > 1e-6 or n < 1:
        raise ValueError(f"{what} = {x:.4g} is not an integer; valid: {valid}")
    return n


def rows(w: torch.Tensor) -> torch.Tensor:
    """[Cout, Cin, Kh, Kw] -> [Cout, L] in OIHW order (a view when possible)."""
    return w.reshape(w.shape[0], -1)


def check_weight(w) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 4:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"weight must be a 4-D OIHW tensor, got {shape}")


def keep_topk(score: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Boolean mask keeping the ``k`` largest entries of ``score`` along ``dim``."""
    idx = torch.topk(score, k, dim=dim, sorted=False).indices
    m = torch.zeros_like(score, dtype=torch.bool)
    return m.scatter_(dim, idx, True)


def invert(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def l1_order(w: torch.Tensor) -> torch.Tensor:
    """Output channels sorted by descending L1 norm (stable: ties keep their order)."""
    return torch.sort(rows(w).abs().sum(1), descending=True, stable=True).indices


class Pattern:
    """A sparsity pattern: mask generator, compressed encoding, exact decode.

    Subclasses set ``name`` and implement ``_reason(shape)`` (why a weight shape cannot take the
    pattern, or None), ``_mask``, ``encode`` and ``decode``.
    """

    name = "pattern"
    permutes = False  # whether the pattern reorders output channels before grouping

    def __init__(self, sparsity, **params):
        self.sparsity = check_sparsity(sparsity)
        self.params = params

    # --- shape checks -------------------------------------------------------------------
    def unsupported(self, shape) -> str | None:
        """Why a weight of this OIHW shape cannot take the pattern, or None when it can."""
        shape = tuple(int(v) for v in shape)
        if len(shape) != 4:
            return f"weight must be 4-D OIHW, got shape {shape}"
        return self._reason(shape)

    def check(self, shape) -> None:
        why = self.unsupported(shape)
        if why:
            raise ValueError(why)

    def _reason(self, shape) -> str | None:
        return None

    # --- masks --------------------------------------------------------------------------
    def mask(self, w: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the weights kept, same shape as ``w`` (original channel order)."""
        check_weight(w)
        self.check(w.shape)
        return self._mask(w.detach())

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask(w)

    def prune(self, w: torch.Tensor):
        """Mask and encode in one step: ``(masked dense weight, encoding)``. Permuting patterns
        compute the permutation once from the dense ``w`` and use it for both."""
        check_weight(w)
        self.check(w.shape)
        w = w.detach()
        if self.permutes:
            perm = self.permutation(w)
            wm = w * self._mask(w, perm=perm)
            return wm, self.encode(wm, perm=perm)
        wm = w * self._mask(w)
        return wm, self.encode(wm)

    def permutation(self, w: torch.Tensor) -> torch.Tensor | None:
        """The output-channel order used for grouping (None when the pattern does not permute)."""
        return None

    def conforms(self, w: torch.Tensor, perm: torch.Tensor | None = None) -> bool:
        """True when ``w`` already has the pattern: projecting it onto the pattern changes
        nothing. Permuting patterns check the given ``perm`` (default: the one computed from
        ``w``)."""
        check_weight(w)
        if self.unsupported(w.shape):
            return False
        return bool(torch.equal(w * self._mask(w.detach(), perm=perm) if self.permutes
                                else w * self._mask(w.detach()), w))

    def density(self) -> float:
        return 1.0 - self.sparsity

    def describe(self) -> str:
        ps = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()) if v is not None)
        return f"{self.name}(S={self.sparsity:g}{', ' + ps if ps else ''})"

    def __repr__(self):
        return self.describe()
