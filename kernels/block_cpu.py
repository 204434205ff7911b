"""bsr_1xn_cpu: 1xN block sparsity on the CPU.

Each block row (N output channels) walks its kept im2col columns (BSR); every input vector it
loads feeds N accumulators, so loads per FMA fall as 1/N. With ``rearrange`` the output channels
are sorted by L1 norm before blocking and the kernel writes each row back to its original
channel. Tunables: N, rearrange, pixel tile T (N*T accumulators must fit the registers), split.
"""

from __future__ import annotations

import torch

from . import _ext
from . import patterns as P
from .cpu_common import SPLITS, CppKernel, default_tile, make_run
from .cpu_layout import CpuLayout
from .registry import pick_divisor, register

MAX_T = {4: 6, 8: 3, 16: 1, 32: 1}
TILES_1XN = (1, 2, 3, 4, 6)
_P = _ext.P
BSR = _ext.Family("bsr_1xn", "bsr_1xn.cpp", {
    # x, crow, col offsets, vals, rowmap, N, geometry, y, bias, residual
    "sc_bsr_1xn": [_P, _P, _P, _P, _P, _ext.I64, _ext.GEO, _P, _P, _P]})


def bsr_1xn(crow, col_off, vals, rowmap, N, cout):
    """Entry over BSR blocks: ``entry(x, geometry, y, bias, res=None)``."""
    name, nnzb = "bsr_1xn", col_off.numel()
    _ext.need(crow.dtype == torch.int32 and col_off.dtype == torch.int64
              and rowmap.dtype == torch.int64 and vals.dtype == torch.float32
              and all(t.is_contiguous() for t in (crow, col_off, vals, rowmap))
              and cout % N == 0 and crow.numel() == cout // N + 1 and int(crow[-1]) == nnzb
              and vals.numel() == nnzb * N and rowmap.numel() == cout,
              f"{name}: bad BSR encoding")

    c_fn = BSR.entry("sc_bsr_1xn")
    pc, po, pv, pr = crow.data_ptr(), col_off.data_ptr(), vals.data_ptr(), rowmap.data_ptr()

    def entry(x, geo, y, bias, res=None):
        _ext.check_io(x, y, geo, name)
        if c_fn(x.data_ptr(), pc, po, pv, pr, N, geo.ref, y.data_ptr(),
                _ext.bias_ptr(bias, geo, name), _ext.res_ptr(res, y, geo, name)):
            BSR.fail("sc_bsr_1xn")
    entry.keep = (crow, col_off, vals, rowmap)  # the tensors behind the pointers
    return entry


@register
class Bsr1xNCpu(CppKernel):
    name = "bsr_1xn_cpu"
    pattern = "1xn"
    space = {"N": P.BLOCK_N, "rearrange": (False, True), "T": TILES_1XN, "split": SPLITS}
    pattern_params = ("N", "rearrange")
    family = BSR

    def _default(self, layer, sparsity, pinned):
        if not _ext.avx512():  # as measured on AVX2 machines (16 vector registers)
            N = pinned.get("N", pick_divisor(P.BLOCK_N, layer.cout, 16))
            allowed = tuple(t for t in TILES_1XN if t <= MAX_T[N])
            return {"N": N, "rearrange": False, "T": default_tile(layer, allowed),
                    "split": "pixels"}
        # measured on ResNet50's layers at 93.75% (AMD EPYC, AVX-512, 2 threads, kernel-only):
        # narrow blocks with wide pixel tiles, threads over output channels, beat N=16 with
        # one-vector tiles 1.6-4.5x, geo-mean 4.5x to 10.1x (N=4, T=6 from 28x28 up; N=8, T=2
        # at 14x14; N=4, T=4 at 7x7)
        pixels = layer.oh * CpuLayout.of(layer).Wq
        want_n, want_t = (4, 6) if pixels >= 700 else (8, 2) if pixels >= 150 else (4, 4)
        want_t = min(want_t, -(-pixels // 16))  # no wholly masked vectors (a Linear: 1 pixel)
        N = pinned.get("N", want_n if layer.cout % want_n == 0
                       else pick_divisor(P.BLOCK_N, layer.cout, 16))
        allowed = [t for t in TILES_1XN if t <= min(MAX_T[N], want_t)]
        return {"N": N, "rearrange": False, "T": max(allowed), "split": "channels"}

    def _reason(self, layer, sparsity, config):
        if config["T"] > MAX_T[config["N"]]:
            return (f"N={config['N']} keeps N*T accumulators in registers: T must be <= "
                    f"{MAX_T[config['N']]}, got {config['T']}")
        return None

    def _prepare(self, layer, weight, sparsity, config):
        pat = self.make_pattern(sparsity, config)
        wm, enc = pat.prune(weight)
        lay = CpuLayout.of(layer)
        taps = layer.kh * layer.kw
        col = enc.col.long()
        col_off = (col // taps) * lay.chan_stride + lay.tap_offsets()[col % taps]
        crow = enc.crow.to(torch.int32).contiguous()
        vals = enc.values.float().contiguous()
        rowmap = enc.perm.to(torch.int64).contiguous()
        col_off = col_off.contiguous()
        self.build()
        entry = bsr_1xn(crow, col_off, vals, rowmap, enc.N, layer.cout)

        return make_run(layer, wm, entry, config["T"], config["split"],
                        info={"kernel": self.name, "nnzb": enc.nnzb, "isa": _ext.isa()},
                        perm=enc.perm)
