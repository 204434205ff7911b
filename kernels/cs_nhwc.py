"""cs_cpu_nhwc: complementary sparsity on the CPU over channels-last activations.

The CS pattern with ``M=1`` (each segment K consecutive input channels, one kept per filter
and tap): for a block of 16 filters, one vector of a pixel's 16 input channels holds every
filter's candidates, a lane permutation picks each filter's kept channel and one FMA
accumulates the 16 filters (csrc/cs_nhwc.cpp). A loaded input vector serves ``FB`` filter
blocks and a block's indices and weights serve ``PB`` pixels, where the planar direct kernel
(``cs_cpu_direct``) loads an input vector for every FMA. Input and output are NHWC (torch's
``channels_last``): a network of these layers hands activations over as they are, and its
residual additions, pools and dense stem run in the same layout. Needs AVX-512 (16 lanes: the
K <= 16 candidates in one vector) and Cin, Cout multiples of 16. Tunable: ``tile``, filter
blocks x pixels per work item. ``run(x)`` is NCHW in and out (conversions included, as for
every kernel's per-layer figure); ``fused`` and ``resident`` return channels-last tensors.
"""

from __future__ import annotations

import torch

from . import _ext
from . import patterns as P
from .cpu_common import CppKernel
from .cpu_layout import check_input
from .registry import Run, register

_P, _I = _ext.P, _ext.I64
CS_NHWC = _ext.Family("cs_nhwc", "cs_nhwc.cpp", {
    # x, idx, w, vector offsets, slots, geometry (int64 [15]), y, bias, residual
    "sc_cs_nhwc": [_P, _P, _P, _P, _I, _P, _P, _P, _P],
})
TILES = ("2x8", "2x12", "3x7", "4x5")  # filter blocks x pixels (csrc/cs_nhwc.cpp)
CL = torch.channels_last


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """``t`` (4-D float32) with channels-last memory, copied only when it is not already."""
    return t if t.is_contiguous(memory_format=CL) else t.contiguous(memory_format=CL)


def encode(enc, cout: int, cin: int, taps: int):
    """The kernel's arrays from a cin-form CS encoding with M=1 (values/idx [Cout, taps,
    Cin/K]): idx and values [Cout/16, slots, 16] (slot = tap * Cin/K + segment, lane = filter
    within its block of 16; idx = the kept channel's lane in the slot's 16-channel vector) and
    the vector offsets [slots] (the float offset of that vector in a pixel)."""
    K, nseg = enc.K, cin // enc.K
    seg = torch.arange(nseg)
    lane = (seg * K % 16).view(1, 1, nseg) + enc.idx.long()  # [Cout, taps, nseg]
    voff = (seg * K // 16 * 16).repeat(taps)  # slot order: tap-major, then segment

    def blocks(a):  # [Cout, taps, nseg] -> [Cout/16, taps*nseg, 16]
        return a.reshape(cout // 16, 16, taps * nseg).permute(0, 2, 1).contiguous()
    return (blocks(lane).to(torch.int32), blocks(enc.values.float()),
            voff.to(torch.int64).contiguous())


@register
class CSCpuNhwc(CppKernel):
    name = "cs_cpu_nhwc"
    pattern = "cs"
    space = {"M": (P.NHWC_M,), "tile": TILES}
    pattern_params = ("M",)
    family = CS_NHWC
    # ahead of cs_cpu_direct in a network without a plan: measured on ResNet50 at 93.75% (AMD
    # EPYC, AVX-512, 2 threads, one process, interleaved) the whole network ran 1.40x faster at
    # batch 1 and 1.36x at batch 8, and kernel-only 1.1-2.4x faster on its 1x1 and 3x3 layers at
    # S 0.5, 0.75 and 0.875; slower on the 64-channel layers at 56x56 (64->64 1x1 by 38% and
    # 3x3 by 15% at batch 1, the three of them by 13-36% at batch 4)
    default_rank = 0

    def make_pattern(self, sparsity, config):
        return P.make("cs", sparsity, form="cin", M=config["M"])

    def available(self) -> str | None:
        if not _ext.avx512():
            return "cs_cpu_nhwc needs AVX-512 (16-lane permutations); this CPU builds without it"
        return None

    def _default(self, layer, sparsity, pinned):
        # measured on ResNet50's layers at 93.75% (AMD EPYC, AVX-512, 2 threads, kernel-only):
        # 2 filter blocks x 8 pixels did best at 56x56 and 28x28 outputs, 4 x 5 at 14x14 and 7x7
        return {"M": P.NHWC_M, "tile": "2x8" if layer.oh >= 28 else "4x5"}

    def _reason(self, layer, sparsity, config):
        K = self.make_pattern(sparsity, config).K
        if K > 16:
            return f"cs_cpu_nhwc: K={K} candidates do not fit one 16-lane vector (S at most 0.9375)"
        if layer.cin % 16 or layer.cout % 16:
            return (f"cs_cpu_nhwc needs Cin and Cout multiples of 16 (Cin={layer.cin}, "
                    f"Cout={layer.cout})")
        if layer.kh * layer.kw > 25:
            return f"cs_cpu_nhwc: at most 25 taps, not {layer.kh}x{layer.kw}"
        return None

    def _prepare(self, layer, weight, sparsity, config):
        wm, enc = self.make_pattern(sparsity, config).prune(weight)
        self.build()
        taps = layer.kh * layer.kw
        idx, vals, voff = encode(enc, layer.cout, layer.cin, taps)
        fb, pb = (int(v) for v in config["tile"].split("x"))
        entry = CS_NHWC.entry("sc_cs_nhwc")
        geos: dict = {}
        name = self.name

        def geometry(n: int, relu: bool):
            key = (n, torch.get_num_threads(), relu)
            if key not in geos:
                geos[key] = torch.tensor(
                    [n, layer.h, layer.w, layer.cin, layer.cout, layer.oh, layer.ow, layer.kh,
                     layer.kw, layer.stride, layer.padding, key[1], int(relu), fb, pb],
                    dtype=torch.int64)
            return geos[key]

        def resident(xl, out=None, bias=None, relu=False, residual=None):
            n = xl.shape[0]
            shape = (n, layer.cout, layer.oh, layer.ow)
            if xl.dtype != torch.float32 or not xl.is_contiguous(memory_format=CL) \
                    or tuple(xl.shape) != (n, layer.cin, layer.h, layer.w):
                raise ValueError(f"{name}: input must be a channels-last float32 "
                                 f"[N, {layer.cin}, {layer.h}, {layer.w}] tensor")
            if out is not None and (tuple(out.shape) != shape or out.dtype != torch.float32):
                raise ValueError(f"{name}: out must be a float32 {list(shape)} tensor")
            # written in place when channels-last; another out is copied into a channels-last
            # buffer first (an element the kernel leaves unwritten keeps what out held, so a
            # NaN-poisoned out still shows it), then back
            y = torch.empty(shape, memory_format=CL) if out is None else _nhwc(out)
            b = None if bias is None or bias.numel() == 0 else bias.detach().float().contiguous()
            if b is not None and b.numel() != layer.cout:
                raise ValueError(f"{name}: bias must have {layer.cout} values")
            r = None if residual is None else _nhwc(residual)
            if r is not None and (tuple(r.shape) != shape or r.dtype != torch.float32):
                raise ValueError(f"{name}: the residual must be a float32 {list(shape)} tensor")
            if entry(xl.data_ptr(), idx.data_ptr(), vals.data_ptr(), voff.data_ptr(),
                     voff.numel(), geometry(n, relu).data_ptr(), y.data_ptr(),
                     None if b is None else b.data_ptr(), None if r is None else r.data_ptr()):
                CS_NHWC.fail("sc_cs_nhwc")
            return y if out is None or out is y else out.copy_(y)

        def layout(x):
            check_input(layer, x, name)
            return _nhwc(x)

        def fused(x, laid_out=False, bias=None, relu=False, dest=None, out=None,
                  residual=None):
            """The layer with its epilogue (bias, then ``residual``, then ReLU) in the kernel;
            NHWC out. ``dest`` (another kernel's planar layout) is not written: a network of
            these layers hands activations over as channels-last tensors."""
            if dest is not None:
                raise ValueError(f"{name}: writes channels-last output, not another layout")
            return resident(layout(x), out, bias, relu, residual)

        def call(x, out=None):
            """NCHW in and out, as every Run (the layout conversions included): a network of
            these layers passes channels-last tensors through ``fused`` instead."""
            y = resident(layout(x), out)
            return y if out is not None else y.contiguous()

        run = Run(wm, call, layout=layout, resident=resident, fused=fused,
                  info={"kernel": name, "K": enc.K, "M": enc.M, "layout": "nhwc",
                        "isa": _ext.isa()})
        run.keep = (idx, vals, voff)  # no planar cpu_layout: nothing hands a layout over to it
        return run
