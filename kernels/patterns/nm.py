"""Reference patterns: N:M (semi-structured) and unstructured magnitude pruning.

N:M keeps the ``N = (1-S)*M`` largest of every ``M`` consecutive weights of the OIHW-flattened
filter row. Unstructured keeps the ``round((1-S)*numel)`` largest weights of the whole layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, exact_int, keep_topk, rows


@dataclass
class NMEncoding:
    values: torch.Tensor  # [Cout, L/M, N]
    idx: torch.Tensor  # uint8 [Cout, L/M, N], ascending, entries < M
    N: int
    M: int
    shape: tuple


@dataclass
class CSREncoding:
    crow: torch.Tensor  # [Cout + 1] int64
    col: torch.Tensor  # [nnz] int32, OIHW-flattened column
    values: torch.Tensor  # [nnz]
    shape: tuple


class NM(Pattern):
    name = "nm"

    def __init__(self, sparsity, M: int = 4):
        super().__init__(sparsity, M=M)
        if not isinstance(M, int) or M < 2:
            raise ValueError(f"N:M group size M must be an integer >= 2, got {M!r}")
        self.M = M
        self.N = exact_int((1.0 - self.sparsity) * M, f"N = (1-S)*M with M={M}",
                           ", ".join(f"{1 - n / M:g}" for n in range(1, M)))

    def _reason(self, shape):
        L = shape[1] * shape[2] * shape[3]
        if L % self.M:
            return f"N:M needs Cin*Kh*Kw={L} divisible by M={self.M}"
        return None

    def _groups(self, w):
        r = rows(w)
        return r.reshape(r.shape[0], -1, self.M)

    def _mask(self, w):
        return keep_topk(self._groups(w).abs(), self.N, dim=2).reshape(w.shape).contiguous()

    def encode(self, w) -> NMEncoding:
        self.check(w.shape)
        g = self._groups(w)
        idx = torch.sort(torch.topk(g.abs(), self.N, dim=2, sorted=False).indices, dim=2).values
        return NMEncoding(values=torch.gather(g, 2, idx).contiguous(),
                          idx=idx.to(torch.uint8).contiguous(), N=self.N, M=self.M,
                          shape=tuple(w.shape))

    def decode(self, enc: NMEncoding) -> torch.Tensor:
        g = torch.zeros(*enc.values.shape[:2], enc.M, dtype=enc.values.dtype,
                        device=enc.values.device)
        g.scatter_(2, enc.idx.long(), enc.values)
        return g.reshape(enc.shape).contiguous()


class Unstructured(Pattern):
    name = "unstructured"

    def _mask(self, w):
        k = max(1, round((1.0 - self.sparsity) * w.numel()))
        return keep_topk(w.abs().flatten(), k, dim=0).reshape(w.shape)

    def encode(self, w) -> CSREncoding:
        r = rows(w)
        row, col = r.nonzero(as_tuple=True)  # row-major: ascending column within a row
        crow = torch.zeros(r.shape[0] + 1, dtype=torch.int64, device=w.device)
        crow[1:] = torch.cumsum(torch.bincount(row, minlength=r.shape[0]), 0)
        return CSREncoding(crow=crow, col=col.to(torch.int32), values=r[row, col].contiguous(),
                           shape=tuple(w.shape))

    def decode(self, enc: CSREncoding) -> torch.Tensor:
        cout, cin, kh, kw = enc.shape
        dense = torch.zeros(cout, cin * kh * kw, dtype=enc.values.dtype, device=enc.values.device)
        row = torch.repeat_interleave(torch.arange(cout, device=enc.crow.device),
                                      enc.crow[1:] - enc.crow[:-1])
        dense[row, enc.col.long()] = enc.values
        return dense.reshape(enc.shape)
