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


@register
class Bsr1xNCpu(CppKernel):
    name = "bsr_1xn_cpu"
    pattern = "1xn"
    space = {"N": P.BLOCK_N, "rearrange": (False, True), "T": TILES_1XN, "split": SPLITS}
    pattern_params = ("N", "rearrange")

    def _default(self, layer, sparsity, pinned):
        N = pinned.get("N", pick_divisor(P.BLOCK_N, layer.cout, 16))
        allowed = tuple(t for t in TILES_1XN if t <= MAX_T[N])
        return {"N": N, "rearrange": False, "T": default_tile(layer, allowed), "split": "pixels"}

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
        mod = _ext.load()

        def entry(xl, geo, y, bias):
            mod.bsr_1xn(xl, crow, col_off, vals, rowmap, enc.N, geo, y, bias)

        return make_run(layer, wm, entry, config["T"], config["split"],
                        info={"kernel": self.name, "nnzb": enc.nnzb, "isa": mod.isa()},
                        perm=enc.perm)
