"""cs_cpu_direct: complementary sparsity on the CPU, the CS paper's direct method along Cin.

Weights stay compressed (``values``/``idx`` of the cin-form CS encoding, M in {2, 4, 8, 16});
the kernel decodes each kept input channel as ``seg*K*M + n + M*Idx`` and feeds one broadcast
weight into T vectors of output pixels. Tunables: M, pixel tile T, how threads split the work
(``pixels``: each thread a range of pixel tiles; ``channels``: a range of output channels), and
the Cin chunk a tile accumulates before moving on (0 = all of Cin at once), the output channels
per work item (``ob``: a Cin chunk stays in L1 while that many channels use it), and ``decode``:
``inline`` decodes the compressed 1-byte indices in the inner loop (the paper's form), ``offsets``
expands them once at prepare time into int32 input offsets, segment-major; ``aligned`` reads
an aligned-row layout (``CpuLayout.of(layer, aligned=True)``: grid rows of whole vectors, every
load on a cache line) with the kept weights grouped by the tap's column shift (up to 3), each
group's sum moved into place by lane shifts (see csrc/cs.cpp). ``aligned`` is the default on
AVX-512 (where it was measured) for KxK layers whose rows it lengthens by at most 15% and
whose rows a tile of the tuning space spans whole (T a multiple of the row's vectors).
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
    # x, vals, offsets, group starts, column shifts, K, M, geometry, y, bias, residual
    "sc_cs_aligned": [_P, _P, _P, _P, _I, _I, _I, _ext.GEO, _P, _P, _P],
})


def _entry(fn: str, name: str, keep: tuple, *args):
    """``entry(x, geometry, y, bias, res=None)`` calling C++ ``fn(x, *args, geometry, y, bias,
    res)``; ``keep``: the tensors behind the pointers in ``args``, alive as long as it is."""
    c_fn = CS.entry(fn)

    def entry(x, geo, y, bias, res=None):
        _ext.check_io(x, y, geo, name)
        if c_fn(x.data_ptr(), *args, geo.ref, y.data_ptr(), _ext.bias_ptr(bias, geo, name),
                _ext.res_ptr(res, y, geo, name)):
            CS.fail(fn)
    entry.keep = keep
    return entry


def cs_direct(vals, idx, tap_off, K, M, cout, cin):
    """Entry over compressed values and 1-byte indices [Cout, taps, Cin/K], decoded in the
    inner loop: ``entry(x, geometry, y, bias, res=None)``."""
    name, taps = "cs_direct", tap_off.numel()
    _ext.need(vals.dtype == torch.float32 and idx.dtype == torch.uint8
              and tap_off.dtype == torch.int64 and vals.is_contiguous() and idx.is_contiguous()
              and tap_off.is_contiguous() and vals.numel() == idx.numel() == cout * taps * (cin // K),
              f"{name}: bad CS encoding")

    return _entry("sc_cs_direct", name, (vals, idx, tap_off), vals.data_ptr(), idx.data_ptr(),
                  tap_off.data_ptr(), taps, K, M)


def cs_offsets(vals, off, K, M, taps, cout, cin):
    """Entry over compressed values with int32 input offsets [Cout, Cin/(K*M), taps*M]
    (segment-major): ``entry(x, geometry, y, bias, res=None)``."""
    name = "cs_offsets"
    _ext.need(vals.dtype == torch.float32 and off.dtype == torch.int32 and vals.is_contiguous()
              and off.is_contiguous() and vals.numel() == off.numel() == cout * taps * cin // K,
              f"{name}: bad CS offsets")

    return _entry("sc_cs_offsets", name, (vals, off), vals.data_ptr(), off.data_ptr(), K, M, taps)


def cs_aligned(vals, off, start, nsets, K, M, cout):
    """Entry of the aligned-row kernel: values and int32 offsets grouped by column shift,
    [Cout, nsets, nseg, .], group ``(o, set, seg)`` at ``start[(o*nsets + set)*nseg + seg]``:
    ``entry(x, geometry, y, bias, res=None)`` over an aligned ``CpuLayout``."""
    name = "cs_aligned"
    _ext.need(vals.dtype == torch.float32 and off.dtype == torch.int32 and start.dtype == torch.int64
              and vals.is_contiguous() and off.is_contiguous() and start.is_contiguous()
              and vals.numel() == off.numel() == int(start[-1]) and 1 <= nsets <= 3
              and (start.numel() - 1) % (cout * nsets) == 0, f"{name}: bad grouped offsets")

    return _entry("sc_cs_aligned", name, (vals, off, start), vals.data_ptr(), off.data_ptr(),
                  start.data_ptr(), nsets, K, M)


def aligned_groups(layer, lay: CpuLayout, chan, vals, M):
    """The aligned kernel's weight lists: ``chan``/``vals`` [Cout, taps, Cin/K] (kept input
    channel and value of each slot) regrouped by column shift ``s // S`` of the tap, then by CS
    segment, each group sorted by input offset (loads walk forward); offsets hold the tap's
    plane and row but not its column shift. Returns (vals, int32 offsets, int64 starts, nsets)."""
    S, ntap = layer.stride, layer.kh * layer.kw
    cout, nseg = layer.cout, chan.shape[2] // M
    nsets = (layer.kw - 1) // S + 1
    rows = lay.tap_offsets(column_shift=False)
    off = (chan * lay.chan_stride + rows.view(1, ntap, 1)).view(cout, ntap, nseg, M)
    v = vals.view(cout, ntap, nseg, M)
    offs, vs, lens = [], [], []
    for k in range(nsets):
        taps = [r * layer.kw + s for r in range(layer.kh) for s in range(layer.kw) if s // S == k]
        o = off[:, taps].permute(0, 2, 1, 3).reshape(cout, nseg, -1)  # [Cout, nseg, taps_k*M]
        w = v[:, taps].permute(0, 2, 1, 3).reshape(cout, nseg, -1)
        o, order = o.sort(dim=2)
        offs.append(o.reshape(cout, -1))
        vs.append(w.gather(2, order).reshape(cout, -1))
        lens.append(o.shape[2])
    off, v = torch.cat(offs, 1), torch.cat(vs, 1)
    if int(off.max()) >= 2**31:
        raise ValueError("cs_cpu_direct: input too large for int32 offsets; use decode='inline'")
    # groups (o, k, g) in that order, each lens[k] long: their starts are the running sum
    sizes = torch.tensor([n for n in lens for _ in range(nseg)] * cout, dtype=torch.int64)
    start = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    return v.contiguous(), off.to(torch.int32).contiguous(), start.contiguous(), nsets


def _aligned_pays(layer) -> bool:
    """Whether the aligned rows are the default: on AVX-512, where they were measured (on AVX2
    a straddling load cost only 1-7% more per FMA, and 8-vector tiles spill its 16 registers),
    for a KxK layer whose rows, rounded up to whole vectors, add at most 15% to its grid (not
    7x7 images: 9 columns become 16) and whose grid row some tile of the tuning space spans
    whole (rows of 1, 2, 3, 4, 6 or 8 vectors: not 224x224, nor 72x72's 5 vectors). Not a 1x1
    layer: at 56x56 and 28x28 its plain layout is aligned already, and at 14x14 and 7x7 the
    padded channels gained 10-15% kernel-only but cost a conversion from NCHW that lost more
    end to end (a block's first 1x1 layer reads the block input, which no sparse layer hands
    over)."""
    if layer.kw == 1 or (layer.kw - 1) // layer.stride + 1 > 3 or not _ext.avx512():
        return False
    return CpuLayout.of(layer, aligned=True).Wq <= 1.15 * CpuLayout.of(layer).Wq \
        and bool(_whole_row_tiles(layer))


def _row_vectors(layer) -> int:
    """Vectors per grid row of the layer's aligned layout: a tile spans a multiple of them."""
    return CpuLayout.of(layer, aligned=True).Wq // _ext.lanes()


def _whole_row_tiles(layer) -> list[int]:
    """The tuning space's tiles T that span whole rows of the layer's aligned layout (none
    where a row is 5 or 7 vectors, or more than 8)."""
    return [t for t in CSCpuDirect.space["T"] if t % _row_vectors(layer) == 0]


@register
class CSCpuDirect(CppKernel):
    name = "cs_cpu_direct"
    pattern = "cs"
    # tuning grid: values measured to matter (the C++ entry accepts T in 1, 2, 3, 4, 6, 8)
    space = {"M": P.CPU_M, "T": (1, 2, 4, 6, 8), "split": SPLITS, "cin_chunk": (0, 32, 64, 128, 256),
             "ob": (8, 32, 128), "decode": ("offsets", "inline", "aligned")}
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
        if not _aligned_pays(layer):
            M = pinned.get("M", max(ms) if ms else P.CPU_M[0])
            return {"M": M, **default_schedule(layer, self.space["T"]), "cin_chunk": 0,
                    "decode": "offsets"}
        # measured on ResNet50's layers at 93.75% (AMD EPYC, AVX-512, 2 threads, kernel-only):
        # the aligned rows gain 15-60% over the offsets default; a KxK layer does best with
        # 8-vector tiles, M=4 and a Cin chunk whose rows stay in L1/L2 (none at 56x56, 64
        # channels at 28x28, 128 at 14x14), channels split between threads in blocks of 32
        M = pinned.get("M", 4 if 4 in ms else max(ms) if ms else P.CPU_M[0])
        T = max(_whole_row_tiles(layer))
        want = 128 if layer.oh <= 14 else 64 if layer.oh <= 28 else 0
        chunk = want if want and want < layer.cin and want % (K * M) == 0 else 0
        return {"M": M, "T": T, "split": "channels", "ob": 32, "cin_chunk": chunk,
                "decode": "aligned"}

    def _reason(self, layer, sparsity, config):
        if config["decode"] == "aligned" and layer.kw > 1:
            shifts = (layer.kw - 1) // layer.stride + 1
            if shifts > 3:
                return (f"decode=aligned: at most 3 column shifts (Kw={layer.kw} at stride "
                        f"{layer.stride} has {shifts})")
            rows = _row_vectors(layer)
            if config["T"] % rows:
                return (f"decode=aligned: a pixel tile spans whole grid rows of {rows} vectors, "
                        f"T={config['T']} does not")
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
        self.build()
        lay = CpuLayout.of(layer, aligned=config["decode"] == "aligned")
        if lay.aligned:
            entry = cs_aligned(*aligned_groups(layer, lay, enc.positions(), vals, enc.M), enc.K,
                               enc.M, layer.cout)
        elif config["decode"] == "inline":
            entry = cs_direct(vals, enc.idx.contiguous(), lay.tap_offsets(), enc.K, enc.M,
                              layer.cout, layer.cin)
        else:
            ntap, nseg = layer.kh * layer.kw, layer.cin // (enc.K * enc.M)
            chan = enc.positions()  # [Cout, taps, Cin/K]: kept input channel of each slot
            off = chan * lay.chan_stride + lay.tap_offsets().view(1, ntap, 1)
            # [Cout, taps, nseg, M] -> [Cout, nseg, taps, M]: a Cin chunk is a contiguous range
            off = off.view(-1, ntap, nseg, enc.M).permute(0, 2, 1, 3).reshape(layer.cout, -1)
            v2 = vals.view(-1, ntap, nseg, enc.M).permute(0, 2, 1, 3).reshape(layer.cout, -1)
            if int(off.max()) >= 2**31:
                raise ValueError(f"{self.name}: input too large for int32 offsets; use "
                                 f"decode='inline'")
            off32, v2 = off.to(torch.int32).contiguous(), v2.contiguous()
            entry = cs_offsets(v2, off32, enc.K, enc.M, ntap, layer.cout, layer.cin)

        return make_run(layer, wm, entry, config["T"], config["split"], config["cin_chunk"],
                        config["ob"], info={"kernel": self.name, "K": enc.K, "M": enc.M,
                                            "isa": _ext.isa()}, lay=lay)
