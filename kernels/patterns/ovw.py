"""OVW, column vector-wise sparsity.

Output channels form groups of ``V`` consecutive channels (after an optional permutation); in each
group, every im2col column (OIHW-flattened position ``p = (c*Kh + r)*Kw + s``) is a ``V x 1``
vector kept or pruned whole. Each group keeps its ``k = round((1-S) * Cin*Kh*Kw)`` vectors of
largest L2 norm, so every group does the same work (exact density ``k / (Cin*Kh*Kw)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, invert, keep_topk, l1_order, rows

OVW_V = (16, 32, 64)


@dataclass
class OVWEncoding:
    perm: torch.Tensor  # [Cout] int64: group row i holds original channel perm[i]
    cols: torch.Tensor  # [Cout/V, k] int32, ascending: kept im2col columns of each group
    values: torch.Tensor  # [Cout/V, k, V]: values[g, j, v] = w[perm[g*V+v], cols[g, j]]
    V: int
    shape: tuple


class OVW(Pattern):
    name = "ovw"
    permutes = True

    def __init__(self, sparsity, V: int = 32, permute: bool = False):
        super().__init__(sparsity, V=V, permute=permute)
        if V not in OVW_V:
            raise ValueError(f"OVW vector length V={V} is not supported; valid: {OVW_V}")
        self.V, self.permute = V, bool(permute)
        self.permutes = self.permute

    def _reason(self, shape):
        cout = shape[0]
        if self.V > cout:
            return f"OVW V={self.V} is larger than Cout={cout}; valid V: " \
                   f"{[v for v in OVW_V if v <= cout and cout % v == 0] or 'none'}"
        if cout % self.V:
            return f"OVW needs Cout={cout} divisible by V={self.V}"
        return None

    def keep_per_group(self, shape) -> int:
        L = shape[1] * shape[2] * shape[3]
        return max(1, round((1.0 - self.sparsity) * L))

    def permutation(self, w):
        return l1_order(w) if self.permute else None

    def _group_view(self, w, perm):
        r = rows(w)
        if perm is not None:
            r = r[perm]
        return r.reshape(r.shape[0] // self.V, self.V, r.shape[1])

    def _mask(self, w, perm=None):
        if perm is None:
            perm = self.permutation(w)
        g = self._group_view(w, perm)
        keep = keep_topk(g.float().norm(dim=1), self.keep_per_group(w.shape), dim=1)
        m = keep[:, None, :].expand_as(g).reshape(w.shape[0], -1)
        if perm is not None:
            m = m[invert(perm)]
        return m.reshape(w.shape).contiguous()

    def encode(self, w, perm=None) -> OVWEncoding:
        self.check(w.shape)
        if perm is None:
            perm = self.permutation(w)
        if perm is None:
            perm = torch.arange(w.shape[0], device=w.device)
        g = self._group_view(w, perm)
        k = self.keep_per_group(w.shape)
        cols = torch.topk(g.float().norm(dim=1), k, dim=1, sorted=False).indices
        cols = torch.sort(cols, dim=1).values
        vals = torch.gather(g, 2, cols[:, None, :].expand(-1, self.V, -1)).transpose(1, 2)
        return OVWEncoding(perm=perm, cols=cols.to(torch.int32).contiguous(),
                           values=vals.contiguous(), V=self.V, shape=tuple(w.shape))

    def decode(self, enc: OVWEncoding) -> torch.Tensor:
        cout, cin, kh, kw = enc.shape
        G, k = enc.cols.shape
        g = torch.zeros(G, enc.V, cin * kh * kw, dtype=enc.values.dtype,
                        device=enc.values.device)
        g.scatter_(2, enc.cols.long()[:, None, :].expand(-1, enc.V, -1), enc.values.transpose(1, 2))
        r = g.reshape(cout, -1)[invert(enc.perm)]
        return r.reshape(enc.shape).contiguous()
