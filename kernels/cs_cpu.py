"""cs_cpu_direct: complementary sparsity on the CPU, the CS paper's direct method along Cin.

Weights stay compressed (``values``/``idx`` of the cin-form CS encoding, M in {2, 4, 8, 16});
the kernel decodes each kept input channel as ``seg*K*M + n + M*Idx`` and feeds one broadcast
weight into T vectors of output pixels. Tunables: M, pixel tile T, how threads split the work
(``pixels``: each thread a range of pixel tiles; ``channels``: a range of output channels), and
the Cin chunk a tile accumulates before moving on (0 = all of Cin at once).
"""

from __future__ import annotations

from . import _ext
from . import patterns as P
from .cpu_common import OBS, SPLITS, TILES, CppKernel, default_tile, make_run
from .cpu_layout import CpuLayout
from .registry import register


@register
class CSCpuDirect(CppKernel):
    name = "cs_cpu_direct"
    pattern = "cs"
    space = {"M": P.CPU_M, "T": TILES, "split": SPLITS, "cin_chunk": (0, 32, 64, 128, 256),
             "ob": OBS}
    pattern_params = ("M",)

    def make_pattern(self, sparsity, config):
        return P.make("cs", sparsity, form="cin", M=config["M"])

    def _default(self, layer, sparsity):
        try:
            K = P.make("cs", sparsity).K
        except ValueError:
            K = 2  # invalid sparsity: supports() reports the pattern's own error
        ms = [m for m in P.CPU_M if layer.cin % (K * m) == 0]
        return {"M": max(ms) if ms else P.CPU_M[0], "T": default_tile(layer), "split": "pixels",
                "cin_chunk": 0, "ob": 8}

    def _reason(self, layer, sparsity, config):
        ch = config["cin_chunk"]
        if ch:
            km = self.make_pattern(sparsity, config).K * config["M"]
            if ch % km or ch >= layer.cin:
                return (f"cin_chunk={ch} must be a multiple of K*M={km} and smaller than "
                        f"Cin={layer.cin}")
        return None

    def _prepare(self, layer, weight, sparsity, config):
        pat = self.make_pattern(sparsity, config)
        wm, enc = pat.prune(weight)
        vals = enc.values.float().contiguous()
        idx = enc.idx.contiguous()
        taps = CpuLayout.of(layer).tap_offsets()
        mod = _ext.load()

        def entry(xl, geo, y):
            mod.cs_direct(xl, vals, idx, taps, enc.K, enc.M, geo, y)

        return make_run(layer, wm, entry, config["T"], config["split"], config["cin_chunk"],
                        config["ob"], info={"kernel": self.name, "K": enc.K, "M": enc.M, "isa": mod.isa()})
