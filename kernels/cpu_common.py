"""Pieces shared by the C++ CPU kernel families: building a Run around a layout and an entry
point, default pixel tiles, and the availability check (the extension builds on first use)."""

from __future__ import annotations

import threading
import weakref

import torch

from . import _ext
from .cpu_layout import CpuLayout, check_input
from .registry import Kernel, Run

TILES = (1, 2, 3, 4, 6, 8)
SPLITS = ("pixels", "channels")


class CppKernel(Kernel):
    """A kernel whose entry points live in one C++ family (``family``, an ``_ext.Family``): its
    identity covers that family's source and headers, the layout pass, and the Python glue,
    not the other families' sources."""
    device = "cpu"
    family: _ext.Family

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "family" in cls.__dict__:
            cls.sources = (*cls.family.sources, *_ext.LAYOUT.sources, "cpu_layout.py",
                           "cpu_common.py", "_ext.py")

    def build(self):
        self.family.load()  # raises KernelBuildError with the compiler's reason
        _ext.LAYOUT.load()


def default_tile(layer, allowed=TILES) -> int:
    """Vectors per pixel tile: large tiles for large images, one tile for small ones."""
    lay = CpuLayout.of(layer)
    vw = 16
    pixels = layer.oh * lay.Wq
    want = 8 if pixels >= 1024 else 4 if pixels >= 256 else max(1, -(-pixels // vw))
    return max(t for t in allowed if t <= want) if any(t <= want for t in allowed) else allowed[0]


def default_schedule(layer, allowed=TILES) -> dict:
    """Tile, split and channel block measured to do well on ResNet50 at 93.75% (2 threads):
    expanding layers (Cout >= 2 Cin) and small 1x1 layers split threads over output channels;
    the rest split over pixels with large channel blocks (a tile's input stays in cache)."""
    pixels = layer.oh * CpuLayout.of(layer).Wq
    channels = layer.cout >= 2 * layer.cin or (layer.kh == 1 and pixels <= 196)
    T = 6 if pixels >= 784 else 4 if pixels > 16 else 1  # one vector: a Linear's 1x1 image
    T = max([t for t in allowed if t <= T] or [allowed[0]])
    return {"T": T, "split": "channels" if channels else "pixels", "ob": 8 if channels else 128}


NO_BIAS = torch.empty(0)


class ThreadBuffers:
    """Buffers kept per calling thread and batch size, made by ``make(batch)`` on first use:
    threads sharing one prepared layer never write into each other's (two threads running one
    fused ResNet50 at once came out off by ~1e-3 relative with shared ones). A thread's buffers
    go with it."""

    def __init__(self, make):
        self.make = make
        self._by_thread: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, n: int) -> torch.Tensor:
        mine = self._by_thread.setdefault(threading.current_thread(), {})
        if n not in mine:
            mine[n] = self.make(n)
        return mine[n]


def make_run(layer, masked_weight, entry, T, split, chunk=0, ob=8, info=None, perm=None,
             lay: CpuLayout | None = None) -> Run:
    """``entry(x_laid_out, geometry, y, bias, res=None)`` computes into ``y`` (NCHW unless the
    geometry names another destination; ``bias`` may be empty; ``res``, laid out like ``y``, is
    added before the ReLU); ``lay`` is the input layout the entry reads (default: the layer's
    plain ``CpuLayout``), kept as the Run's ``cpu_layout``."""
    lay = lay or CpuLayout.of(layer)
    bufs = ThreadBuffers(lay.empty)
    geos: dict[tuple, _ext.Geometry] = {}
    cout = layer.cout
    name = (info or {}).get("kernel", "cpu kernel")

    def geometry(n, where=None, relu=False):
        """One Geometry (and its C struct) per batch, thread count and destination."""
        key = (n, torch.get_num_threads(), None if where is None else tuple(where), relu)
        if key not in geos:
            geos[key] = lay.geometry(n, cout, T, ob, chunk, split, key[1], where, relu)
        return geos[key]

    def resident(xl, out=None):
        n = xl.shape[0]
        if out is None:
            out = torch.empty(n, cout, layer.oh, layer.ow)
        elif out.shape != (n, cout, layer.oh, layer.ow) or not out.is_contiguous() \
                or out.dtype != torch.float32:
            raise ValueError(f"{name}: out must be a contiguous float32 "
                             f"[{n}, {cout}, {layer.oh}, {layer.ow}] tensor")
        entry(xl, geometry(n), out, NO_BIAS)
        return out

    def fused(x, laid_out=False, bias=None, relu=False, dest: CpuLayout | None = None,
              out=None, residual=None):
        """The layer with its epilogue: ``x`` NCHW (or already in this layer's layout when
        ``laid_out``), bias added, then ``residual`` (a residual block's shortcut, laid out like
        the output: NCHW, or ``dest``'s stride-1 layout), then ReLU applied in the kernel, the
        result written as NCHW or, given the next layer's ``dest`` layout, straight into ``out``
        in that layout (a buffer from ``dest.empty``: its padding stays zero)."""
        xl = x if laid_out else laid(x)
        n = xl.shape[0]
        if dest is None:
            out = torch.empty(n, cout, layer.oh, layer.ow) if out is None else out
            where = None
        else:
            d = dest.layer
            if (d.cin, d.h, d.w) != (cout, layer.oh, layer.ow):
                raise ValueError(f"{name}: cannot hand {layer.shape_str} over to "
                                 f"{d.shape_str}")
            out = dest.empty(n) if out is None else out
            where = dest.destination()
        b = NO_BIAS if bias is None else bias.detach().float().contiguous()
        entry(xl, geometry(n, where, relu), out, b,
              None if residual is None else residual.contiguous())
        return out

    def layout(x):
        check_input(layer, x, name)
        return lay.layout(x)

    def laid(x):
        """NCHW ``x`` in this layer's layout (a buffer kept per batch size and calling thread;
        only its interior is written, so its padding stays zero)."""
        check_input(layer, x, name)
        if lay.direct:
            return x.contiguous()
        return lay.fill(x, bufs.get(x.shape[0]))

    def call(x, out=None):
        return resident(laid(x), out)

    kind = "direct" if lay.direct else f"planes S={lay.S}"
    run = Run(masked_weight, call, layout=layout, resident=resident, perm=perm, fused=fused,
              info={"layout": kind + (" aligned" if lay.aligned else ""), **(info or {})})
    run.cpu_layout = lay  # what a producer handing over to this layer writes
    return run
