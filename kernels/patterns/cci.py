"""CCI, cross-channel intragroup sparsity.

Output channels form groups of ``G`` consecutive channels; at each input position (im2col column
``p = (c*Kh + r)*Kw + s``) a group keeps exactly ``s = (1-S)*G`` of its ``G`` weights, the largest
in magnitude. Each kept weight carries its row inside the group (``ceil(log2 G)`` bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Pattern, exact_int, keep_topk, rows

CCI_G = (2, 4, 8, 16)


@dataclass
class CCIEncoding:
    values: torch.Tensor  # [Cout/G, L, s]
    rows: torch.Tensor  # uint8 [Cout/G, L, s], ascending, entries < G
    G: int
    s: int
    shape: tuple

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.G)))


class CCI(Pattern):
    name = "cci"

    def __init__(self, sparsity, G: int = 4):
        super().__init__(sparsity, G=G)
        if G not in CCI_G:
            raise ValueError(f"CCI group size G={G} is not supported; valid: {CCI_G}")
        valid = [f"{1 - k / G:g}" for k in range(1, G)]
        self.G = G
        self.s = exact_int((1.0 - self.sparsity) * G, f"CCI kept per group s = (1-S)*G with G={G}",
                           "sparsity in " + ", ".join(valid))
        if self.s >= G:
            raise ValueError(f"CCI sparsity {self.sparsity} keeps all {G} weights of a group")

    def _reason(self, shape):
        if shape[0] % self.G:
            return f"CCI needs Cout={shape[0]} divisible by G={self.G}"
        return None

    def _groups(self, w):
        r = rows(w)
        return r.reshape(r.shape[0] // self.G, self.G, r.shape[1])  # [B, G, L]

    def _mask(self, w):
        g = self._groups(w)
        return keep_topk(g.abs(), self.s, dim=1).reshape(w.shape).contiguous()

    def encode(self, w) -> CCIEncoding:
        self.check(w.shape)
        g = self._groups(w)
        idx = torch.topk(g.abs(), self.s, dim=1, sorted=False).indices
        idx = torch.sort(idx, dim=1).values  # [B, s, L]
        vals = torch.gather(g, 1, idx)
        return CCIEncoding(values=vals.transpose(1, 2).contiguous(),
                           rows=idx.transpose(1, 2).to(torch.uint8).contiguous(),
                           G=self.G, s=self.s, shape=tuple(w.shape))

    def decode(self, enc: CCIEncoding) -> torch.Tensor:
        cout = enc.shape[0]
        B, L, s = enc.values.shape
        g = torch.zeros(B, enc.G, L, dtype=enc.values.dtype, device=enc.values.device)
        g.scatter_(1, enc.rows.long().transpose(1, 2), enc.values.transpose(1, 2))
        return g.reshape(cout, -1).reshape(enc.shape).contiguous()
