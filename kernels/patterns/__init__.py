"""Sparsity patterns: ``make(name, sparsity, **params) -> Pattern``.

Every pattern has ``mask(w)``, ``encode(w)``, ``decode(enc)``, ``conforms(w)`` and
``unsupported(shape)``; see each module for its encoding. Names: ``cs``, ``ovw``, ``1xn``, ``cci``,
``nm``, ``unstructured``.
"""

from __future__ import annotations

import inspect

from .base import POW2_SPARSITIES, Pattern, check_sparsity
from .block import BLOCK_N, Block1xN, BSREncoding
from .cci import CCI, CCI_G, CCIEncoding
from .cs import CIN_M, CPU_M, CS, NHWC_M, CSEncoding
from .nm import NM, CSREncoding, NMEncoding, Unstructured
from .ovw import OVW, OVW_V, OVWEncoding

PATTERNS: dict[str, type[Pattern]] = {
    "cs": CS, "ovw": OVW, "1xn": Block1xN, "cci": CCI, "nm": NM, "unstructured": Unstructured,
}

#: the free parameter of each pattern and the values a sweep tries
SWEEP_PARAMS = {"cs": ("M", CIN_M), "ovw": ("V", OVW_V), "1xn": ("N", BLOCK_N),
                "cci": ("G", CCI_G), "nm": ("M", (4, 8, 16)), "unstructured": (None, ())}

SUMMARY = {
    "cs": "complementary: one kept in each group of K=1/(1-S) weights spaced M apart",
    "ovw": "column vector-wise: V x 1 vectors (V output channels, one im2col column)",
    "1xn": "1xN blocks: N output channels at one input channel and tap; BSR",
    "cci": "cross-channel intragroup: s of G output channels kept at each input position",
    "nm": "N:M semi-structured along the filter row (reference)",
    "unstructured": "global magnitude pruning (reference)",
}


def make(name: str, sparsity, **params) -> Pattern:
    """Build a pattern; unknown names or parameters raise ValueError naming what is valid."""
    key = str(name).lower()
    if key not in PATTERNS:
        raise ValueError(f"unknown pattern {name!r}; valid: {', '.join(PATTERNS)}")
    cls = PATTERNS[key]
    sig = inspect.signature(cls.__init__)
    allowed = [p for p in sig.parameters if p not in ("self", "sparsity")]
    bad = sorted(set(params) - set(allowed))
    if bad:
        raise ValueError(f"pattern {key!r} has no parameter(s) {bad}; valid: {allowed or 'none'}")
    check_sparsity(sparsity)
    return cls(sparsity, **params)


def names() -> list[str]:
    return list(PATTERNS)


__all__ = ["make", "names", "Pattern", "PATTERNS", "SWEEP_PARAMS", "SUMMARY", "POW2_SPARSITIES",
           "CSEncoding", "OVWEncoding", "BSREncoding", "CCIEncoding", "NMEncoding", "CSREncoding",
           "CPU_M", "NHWC_M", "CIN_M", "OVW_V", "BLOCK_N", "CCI_G"]
