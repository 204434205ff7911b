"""cs_cpu_direct: complementary sparsity on the CPU, the CS paper's direct method along Cin.

Weights stay compressed (``values``/``idx`` of the cin-form CS encoding, M in {2, 4, 8, 16});
the kernel decodes each kept input channel as ``seg*K*M + n + M*Idx`` and feeds one broadcast
weight into T vectors of output pixels. Tunables: M, pixel tile T, how threads split the work
(``pixels``: each thread a range of pixel tiles; ``channels``: a range of output channels), and
the Cin chunk a tile accumulates before moving on (0 = all of Cin at once), the output channels
per work item (``ob``: a Cin chunk stays in L1 while that many channels use it), and ``decode``:
``inline`` decodes the compressed 1-byte indices in the inner loop (the paper's form), ``offsets``
expands them once at prepare time into int32 input offsets, segment-major.
"""

from __future__ import annotations

import torch

from . import _ext
from . import patterns as P
from .cpu_common import SPLITS, CppKernel, default_schedule, make_run
from .cpu_layout import CpuLayout
from .registry import register

_P, _I = _ext.P, _ext.I64
CS = _ext.Family("cs", "cs.cpp", {
    # x, vals, idx, tap offsets, taps, K, M, geometry, y, bias, residual
    "sc_cs_direct": [_P, _P, _P, _P, _I, _I, _I, _ext.GEO, _P, _P, _P],
    # x, vals, offsets, K, M, taps, geometry, y, bias, residual
    "sc_cs_offsets": [_P, _P, _P, _I, _I, _I, _ext.GEO, _P, _P, _P],
})


def cs_direct(vals, idx, tap_off, K, M, cout, cin):
    """Entry over compressed values and 1-byte indices [Cout, taps, Cin/K], decoded in the
    inner loop: ``entry(x, geometry, y, bias, res=None)``."""
    name, taps = "cs_direct", tap_off.numel()
    _ext.need(vals.dtype == torch.float32 and idx.dtype == torch.uint8
              and tap_off.dtype == torch.int64 and vals.is_contiguous() and idx.is_contiguous()
              and tap_off.is_contiguous() and vals.numel() == idx.numel() == cout * taps * (cin // K),
              f"{name}: bad CS encoding")

    c_fn = CS.entry("sc_cs_direct")
    pv, pi, pt = vals.data_ptr(), idx.data_ptr(), tap_off.data_ptr()

    def entry(x, geo, y, bias, res=None):
        _ext.check_io(x, y, geo, name)
        if c_fn(x.data_ptr(), pv, pi, pt, taps, K, M, geo.ref, y.data_ptr(),
                _ext.bias_ptr(bias, geo, name), _ext.res_ptr(res, y, geo, name)):
            CS.fail("sc_cs_direct")
    entry.keep = (vals, idx, tap_off)  # the tensors behind the pointers live as long as it does
    return entry


def cs_offsets(vals, off, K, M, taps, cout, cin):
    """Entry over compressed values with int32 input offsets [Cout, Cin/(K*M), taps*M]
    (segment-major): ``entry(x, geometry, y, bias, res=None)``."""
    name = "cs_offsets"
    _ext.need(vals.dtype == torch.float32 and off.dtype == torch.int32 and vals.is_contiguous()
              and off.is_contiguous() and vals.numel() == off.numel() == cout * taps * cin // K,
              f"{name}: bad CS offsets")

    c_fn = CS.entry("sc_cs_offsets")
    pv, po = vals.data_ptr(), off.data_ptr()

    def entry(x, geo, y, bias, res=None):
        _ext.check_io(x, y, geo, name)
        if c_fn(x.data_ptr(), pv, po, K, M, taps, geo.ref, y.data_ptr(),
                _ext.bias_ptr(bias, geo, name), _ext.res_ptr(res, y, geo, name)):
            CS.fail("sc_cs_offsets")
    entry.keep = (vals, off)  # the tensors behind the pointers live as long as it does
    return entry


@register
class CSCpuDirect(CppKernel):
    name = "cs_cpu_direct"
    pattern = "cs"
    # tuning grid: values measured to matter (the C++ entry accepts T in 1, 2, 3, 4, 6, 8)
    space = {"M": P.CPU_M, "T": (1, 2, 4, 6, 8), "split": SPLITS, "cin_chunk": (0, 64, 256),
             "ob": (8, 128), "decode": ("offsets", "inline")}
    pattern_params = ("M",)
    family = CS

    def make_pattern(self, sparsity, config):
        return P.make("cs", sparsity, form="cin", M=config["M"])

    def _default(self, layer, sparsity, pinned):
        try:
            K = P.make("cs", sparsity).K
        except ValueError:
            K = 2  # invalid sparsity: supports() reports the pattern's own error
        ms = [m for m in P.CPU_M if layer.cin % (K * m) == 0]
        M = pinned.get("M", max(ms) if ms else P.CPU_M[0])
        return {"M": M, **default_schedule(layer, self.space["T"]), "cin_chunk": 0,
                "decode": "offsets"}

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
        self.build()
        if config["decode"] == "inline":
            entry = cs_direct(vals, idx, taps, enc.K, enc.M, layer.cout, layer.cin)
        else:
            cs = CpuLayout.of(layer).chan_stride
            ntap, nseg = layer.kh * layer.kw, layer.cin // (enc.K * enc.M)
            chan = enc.positions()  # [Cout, taps, Cin/K]: kept input channel of each slot
            off = chan * cs + taps.view(1, ntap, 1)
            # [Cout, taps, nseg, M] -> [Cout, nseg, taps, M]: a Cin chunk is a contiguous range
            off = off.view(-1, ntap, nseg, enc.M).permute(0, 2, 1, 3).reshape(layer.cout, -1)
            v2 = vals.view(-1, ntap, nseg, enc.M).permute(0, 2, 1, 3).reshape(layer.cout, -1)
            if int(off.max()) >= 2**31:
                raise ValueError(f"{self.name}: input too large for int32 offsets; use "
                                 f"decode='inline'")
            off32, v2 = off.to(torch.int32).contiguous(), v2.contiguous()
            entry = cs_offsets(v2, off32, enc.K, enc.M, ntap, layer.cout, layer.cin)

        return make_run(layer, wm, entry, config["T"], config["split"], config["cin_chunk"],
                        config["ob"], info={"kernel": self.name, "K": enc.K, "M": enc.M, "isa": _ext.isa()})
