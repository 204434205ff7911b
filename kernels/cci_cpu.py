"""cci_cpu: CCI sparsity on the CPU, and unstructured_cpu as a reference.

Output-stationary: each output channel's pixel tile stays in registers while the kernel streams
that channel's kept weights (the CCI encoding regrouped per output row at prepare time, each
entry an input offset and a value). The G rows of a group read the same input columns, so the
group's input window stays in L1 across its rows.
"""

from __future__ import annotations

import torch

from . import _ext
from . import patterns as P
from .cpu_common import SPLITS, TILES, CppKernel, default_tile, make_run
from .cpu_layout import CpuLayout
from .registry import register

_P = _ext.P
ROW_SPARSE = _ext.Family("row_sparse", "row_sparse.cpp", {
    # x, row pointer, offsets, vals, geometry, y, bias, residual
    "sc_row_sparse": [_P, _P, _P, _P, _ext.GEO, _P, _P, _P]})


def row_sparse(rptr, off, vals, cout):
    """Entry over per-output-channel lists: ``entry(x, geometry, y, bias, res=None)``."""
    name = "row_sparse"
    _ext.need(rptr.dtype == off.dtype == torch.int64 and vals.dtype == torch.float32
              and all(t.is_contiguous() for t in (rptr, off, vals))
              and rptr.numel() == cout + 1 and off.numel() == vals.numel() == int(rptr[-1]),
              f"{name}: bad row lists")

    c_fn = ROW_SPARSE.entry("sc_row_sparse")
    pr, po, pv = rptr.data_ptr(), off.data_ptr(), vals.data_ptr()

    def entry(x, geo, y, bias, res=None):
        _ext.check_io(x, y, geo, name)
        if c_fn(x.data_ptr(), pr, po, pv, geo.ref, y.data_ptr(), _ext.bias_ptr(bias, geo, name),
                _ext.res_ptr(res, y, geo, name)):
            ROW_SPARSE.fail("sc_row_sparse")
    entry.keep = (rptr, off, vals)  # the tensors behind the pointers
    return entry


def _row_lists(layer, rows_o, cols, vals):
    """Per output channel: CSR of (input offset, value), ascending input column."""
    lay = CpuLayout.of(layer)
    taps = layer.kh * layer.kw
    order = torch.argsort(rows_o * (layer.cin * taps) + cols)
    rows_o, cols, vals = rows_o[order], cols[order], vals[order]
    rptr = torch.zeros(layer.cout + 1, dtype=torch.int64)
    rptr[1:] = torch.cumsum(torch.bincount(rows_o, minlength=layer.cout), 0)
    off = (cols // taps) * lay.chan_stride + lay.tap_offsets()[cols % taps]
    return rptr, off.contiguous(), vals.float().contiguous()


class _RowSparse(CppKernel):
    family = ROW_SPARSE

    def _default(self, layer, sparsity, pinned):
        return {**{k: v[0] for k, v in self.space.items()}, "T": default_tile(layer),
                "split": "pixels"}

    def _run(self, layer, wm, rows_o, cols, vals, info):
        rptr, off, v = _row_lists(layer, rows_o, cols, vals)
        self.build()
        T, split = info.pop("T"), info.pop("split")
        entry = row_sparse(rptr, off, v, layer.cout)

        return make_run(layer, wm, entry, T, split, info={"kernel": self.name, **info,
                                                          "isa": _ext.isa()})


@register
class CCICpu(_RowSparse):
    name = "cci_cpu"
    pattern = "cci"
    space = {"G": P.CCI_G, "T": TILES, "split": SPLITS}
    pattern_params = ("G",)

    def _default(self, layer, sparsity, pinned):
        # the smallest group that expresses the sparsity exactly (or the one the sweep pins)
        for G in ([pinned["G"]] if "G" in pinned else (4, 8, 16, 2)):
            try:
                P.make("cci", sparsity, G=G)
            except ValueError:
                continue
            if layer.cout % G == 0:
                return {"G": G, "T": default_tile(layer), "split": "pixels"}
        return {"G": 4, "T": default_tile(layer), "split": "pixels"}

    def _prepare(self, layer, weight, sparsity, config):
        pat = self.make_pattern(sparsity, config)
        wm, enc = pat.prune(weight)
        B, L, s = enc.values.shape
        b = torch.arange(B).view(B, 1, 1).expand(B, L, s)
        col = torch.arange(L).view(1, L, 1).expand(B, L, s)
        rows_o = (b * enc.G + enc.rows.long()).reshape(-1)
        return self._run(layer, wm, rows_o, col.reshape(-1), enc.values.reshape(-1),
                         {"G": enc.G, "s": enc.s, "T": config["T"], "split": config["split"]})


@register
class UnstructuredCpu(_RowSparse):
    name = "unstructured_cpu"
    pattern = "unstructured"
    space = {"T": TILES, "split": SPLITS}

    def _prepare(self, layer, weight, sparsity, config):
        wm, enc = self.make_pattern(sparsity, config).prune(weight)
        rows_o = torch.repeat_interleave(torch.arange(layer.cout), enc.crow[1:] - enc.crow[:-1])
        return self._run(layer, wm, rows_o, enc.col.long(), enc.values,
                         {"T": config["T"], "split": config["split"]})
