"""Complementary sparsity (CS).

With ``K = 1/(1-S)`` (a power of two), each segment of ``L = K*M`` consecutive positions holds ``M`` groups; group
``j < M`` is the K positions ``j, j+M, ..., j+(K-1)M`` and keeps exactly its largest-magnitude
weight. Compressed: value ``Ws[.., n]`` and index ``Idx[.., n] < K`` (``ceil(log2 K)`` bits), the
kept position inside segment ``g`` being ``g*L + (n mod M) + M*Idx`` where ``n = g*M + (n mod M)``.

Two segmentations:

* ``form="row"`` (GPU): along the OIHW-flattened filter row of length ``R = Cin*Kh*Kw``; by
  default one segment, ``M = R/K`` (as large as possible).
* ``form="cin"`` (CPU kernels): along Cin at each kernel tap, ``M`` in {1, 2, 4, 8, 16},
  Cin a multiple of ``K*M``. Encoded arrays are ``[Cout, Kh*Kw, Cin/K]`` (tap-major). ``M=1``
  makes each segment K consecutive channels (the channels-last kernel, ``cs_cpu_nhwc``: its
  candidates lie inside one vector of a pixel's channels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Pattern, exact_int

CPU_M = (2, 4, 8, 16)  # the planar direct kernel's (cs_cpu_direct)
NHWC_M = 1  # the channels-last kernel's (cs_cpu_nhwc)
CIN_M = (NHWC_M, *CPU_M)  # every cin-form M


@dataclass
class CSEncoding:
    values: torch.Tensor  # row: [Cout, R/K]; cin: [Cout, Kh*Kw, Cin/K]
    idx: torch.Tensor  # uint8, same shape, entries < K
    K: int
    M: int
    form: str
    shape: tuple  # dense OIHW shape

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.K)))

    def positions(self) -> torch.Tensor:
        """Kept position of each value inside its row (row form) or Cin vector (cin form):
        ``g*K*M + n%M + M*Idx`` for compressed slot ``n = g*M + n%M``."""
        n = torch.arange(self.values.shape[-1], device=self.idx.device)
        g, j = n // self.M, n % self.M
        return g * self.K * self.M + j + self.M * self.idx.long()


class CS(Pattern):
    name = "cs"

    def __init__(self, sparsity, form: str = "cin", M: int | None = None):
        super().__init__(sparsity, form=form, M=M)
        valid = "0.5, 0.75, 0.875, 0.9375, 0.96875"
        self.K = exact_int(1.0 / (1.0 - self.sparsity), f"CS sparsity {self.sparsity:g}: K = 1/(1-S)",
                           valid)
        if self.K < 2 or self.K & (self.K - 1) or self.K > 256:
            raise ValueError(f"CS sparsity {self.sparsity:g} gives K={self.K}; K must be a power of "
                             f"two (indices fill log2 K bits), so valid sparsities are {valid}")
        if form not in ("row", "cin"):
            raise ValueError(f"CS form {form!r} is unknown; valid: 'row' (GPU), 'cin' (CPU)")
        if form == "cin":
            M = 4 if M is None else M
            if M not in CIN_M:
                raise ValueError(f"CS cin-form M={M} is not supported; valid: {CIN_M}")
        elif M is not None and (not isinstance(M, int) or M < 1):
            raise ValueError(f"CS M must be a positive integer, got {M!r}")
        self.form, self.M = form, M

    def _seg_M(self, shape) -> int:
        if self.form == "row" and self.M is None:
            return shape[1] * shape[2] * shape[3] // self.K
        return self.M

    def _reason(self, shape):
        cout, cin, kh, kw = shape
        K = self.K
        if self.form == "cin":
            if cin % (K * self.M):
                return (f"CS (cin form) needs Cin={cin} divisible by K*M={K}*{self.M}={K * self.M}"
                        f"; valid M for this layer: "
                        f"{[m for m in CIN_M if cin % (K * m) == 0] or 'none'}")
            return None
        R = cin * kh * kw
        M = self._seg_M(shape)
        if M < 1 or R % (K * M):
            return f"CS (row form) needs Cin*Kh*Kw={R} divisible by K*M={K}*{M}"
        return None

    def _grouped(self, w):
        """View of ``w`` as [..., nseg, K, M]: axis -2 walks a group's K candidates."""
        cout, cin, kh, kw = w.shape
        M = self._seg_M(w.shape)
        if self.form == "row":
            return w.reshape(cout, -1, self.K, M)
        return w.permute(0, 2, 3, 1).reshape(cout, kh * kw, -1, self.K, M)

    def _ungroup(self, g, shape):
        cout, cin, kh, kw = shape
        if self.form == "row":
            return g.reshape(shape)
        return g.reshape(cout, kh, kw, cin).permute(0, 3, 1, 2)

    def _mask(self, w):
        g = self._grouped(w)
        keep = g.abs().argmax(dim=-2, keepdim=True)
        m = torch.zeros_like(g, dtype=torch.bool).scatter_(-2, keep, True)
        return self._ungroup(m, w.shape).contiguous()

    def encode(self, w) -> CSEncoding:
        self.check(w.shape)
        g = self._grouped(w)
        idx = g.abs().argmax(dim=-2, keepdim=True)
        vals = torch.gather(g, -2, idx).squeeze(-2)
        lead = vals.shape[:-2]
        return CSEncoding(values=vals.reshape(*lead, -1).contiguous(),
                          idx=idx.squeeze(-2).reshape(*lead, -1).to(torch.uint8).contiguous(),
                          K=self.K, M=self._seg_M(w.shape), form=self.form, shape=tuple(w.shape))

    def decode(self, enc: CSEncoding) -> torch.Tensor:
        cout, cin, kh, kw = enc.shape
        n_last = enc.values.shape[-1]
        vals = enc.values.reshape(*enc.values.shape[:-1], n_last // enc.M, 1, enc.M)
        idx = enc.idx.long().reshape(vals.shape)
        full = torch.zeros(*vals.shape[:-2], enc.K, enc.M, dtype=enc.values.dtype,
                           device=enc.values.device)
        full.scatter_(-2, idx, vals)
        return self._ungroup(full, enc.shape).contiguous()
