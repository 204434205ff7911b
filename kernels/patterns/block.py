"""1xN block sparsity.

A block is ``N`` consecutive output channels at one im2col column (input channel and kernel tap,
OIHW-flattened ``p = (c*Kh + r)*Kw + s``). Blocks are ranked by L1 norm over the whole layer and
the ``round((1-S) * nblocks)`` largest are kept (exact density). With ``rearrange=True`` output
channels are first sorted by descending L1 norm (filter rearrangement), so channels of similar
magnitude share blocks; the permutation is kept so outputs return in the original order (a
network would permute the next layer's input channels instead).

Encoding: BSR over the rearranged ``[Cout, Cin*Kh*Kw]`` matrix with ``N x 1`` blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, invert, l1_order, rows

BLOCK_N = (4, 8, 16, 32)


@dataclass
class BSREncoding:
    perm: torch.Tensor  # [Cout] int64: block row b, lane i holds original channel perm[b*N+i]
    crow: torch.Tensor  # [Cout/N + 1] int32: blocks of block-row b are crow[b]:crow[b+1]
    col: torch.Tensor  # [nnzb] int32, ascending within a block row: the im2col column
    values: torch.Tensor  # [nnzb, N]
    N: int
    shape: tuple

    @property
    def nnzb(self) -> int:
        return int(self.col.numel())


class Block1xN(Pattern):
    name = "1xn"
    permutes = True

    def __init__(self, sparsity, N: int = 8, rearrange: bool = False):
        super().__init__(sparsity, N=N, rearrange=rearrange)
        if N not in BLOCK_N:
            raise ValueError(f"1xN block size N={N} is not supported; valid: {BLOCK_N}")
        self.N, self.rearrange = N, bool(rearrange)
        self.permutes = self.rearrange

    def _reason(self, shape):
        if shape[0] % self.N:
            return f"1xN needs Cout={shape[0]} divisible by N={self.N}"
        return None

    def permutation(self, w):
        return l1_order(w) if self.rearrange else None

    def kept_blocks(self, shape) -> int:
        nb = shape[0] // self.N * shape[1] * shape[2] * shape[3]
        return max(1, round((1.0 - self.sparsity) * nb))

    def _blocks(self, w, perm):
        r = rows(w)
        if perm is not None:
            r = r[perm]
        return r.reshape(r.shape[0] // self.N, self.N, r.shape[1])  # [B, N, L]

    def _keep(self, b, shape):
        score = b.float().abs().sum(1).flatten()
        idx = torch.topk(score, self.kept_blocks(shape), sorted=False).indices
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(0, idx, True)
        return keep.reshape(b.shape[0], b.shape[2])  # [B, L]

    def _mask(self, w, perm=None):
        if perm is None:
            perm = self.permutation(w)
        b = self._blocks(w, perm)
        m = self._keep(b, w.shape)[:, None, :].expand_as(b).reshape(w.shape[0], -1)
        if perm is not None:
            m = m[invert(perm)]
        return m.reshape(w.shape).contiguous()

    def encode(self, w, perm=None) -> BSREncoding:
        self.check(w.shape)
        if perm is None:
            perm = self.permutation(w)
        if perm is None:
            perm = torch.arange(w.shape[0], device=w.device)
        b = self._blocks(w, perm)
        keep = self._keep(b, w.shape)
        brow, bcol = keep.nonzero(as_tuple=True)  # row-major: ascending col within a row
        counts = torch.bincount(brow, minlength=b.shape[0])
        crow = torch.zeros(b.shape[0] + 1, dtype=torch.int32, device=w.device)
        crow[1:] = torch.cumsum(counts, 0)
        vals = b[brow, :, bcol]  # [nnzb, N]
        return BSREncoding(perm=perm, crow=crow, col=bcol.to(torch.int32), values=vals.contiguous(),
                           N=self.N, shape=tuple(w.shape))

    def decode(self, enc: BSREncoding) -> torch.Tensor:
        cout, cin, kh, kw = enc.shape
        B = cout // enc.N
        b = torch.zeros(B, enc.N, cin * kh * kw, dtype=enc.values.dtype, device=enc.values.device)
        brow = torch.repeat_interleave(torch.arange(B, device=enc.crow.device),
                                       (enc.crow[1:] - enc.crow[:-1]).long())
        b[brow, :, enc.col.long()] = enc.values
        r = b.reshape(cout, -1)[invert(enc.perm)]
        return r.reshape(enc.shape).contiguous()
