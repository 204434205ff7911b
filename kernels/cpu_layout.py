"""The CPU kernels' input layout (see kernels/csrc/common.h).

Per image and input channel: the zero-padded input split into stride-phase planes; plane
(a, b) is the ``Hq x Wq`` grid of padded pixels ``(S*i + a, S*j + b)``. Output pixel
``q = oh*Wq + ow`` of kernel tap (r, s) reads ``plane(r%S, s%S) + (r//S)*Wq + s//S + q``.
Only planes some tap reads are stored (``a < min(S, Kh)``, ``b < min(S, Kw)``). A 1x1,
stride-1, unpadded layer needs no conversion at all (``direct``).

``aligned`` (the aligned-row kernels): a layer with more than one kernel column gets grid rows
``Wq`` rounded up to a multiple of 16 floats, so with 64-byte aligned buffers (PyTorch's CPU
allocator) and channel regions of whole vectors every row, plane and channel starts on a cache
line; a 1x1 layer whose image is not whole vectors gets its channels padded to them (not direct).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shapes import ConvLayer

from . import _ext
from ._ext import Geometry

ALIGN = 16


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


@dataclass(frozen=True)
class CpuLayout:
    layer: ConvLayer
    direct: bool
    S: int
    na: int  # planes along rows
    nb: int  # planes along columns
    Hq: int
    Wq: int
    chan_stride: int
    aligned: bool = False

    @classmethod
    def of(cls, layer: ConvLayer, aligned: bool = False) -> CpuLayout:
        S, p = layer.stride, layer.padding
        if S == 1 and p == 0 and layer.kh == 1 and layer.kw == 1 \
                and not (aligned and layer.h * layer.w % ALIGN):
            return cls(layer, True, 1, 1, 1, layer.h, layer.w, layer.h * layer.w, aligned)
        Hq = -(-(layer.h + 2 * p) // S)
        Wq = -(-(layer.w + 2 * p) // S)
        if aligned and layer.kw > 1:
            Wq = _round_up(Wq, ALIGN)
        na, nb = min(S, layer.kh), min(S, layer.kw)
        # slack past the planes covers the (Kw-1)//S overrun of the last row's garbage columns,
        # so reads of the last channel stay inside the buffer
        cs = _round_up(na * nb * Hq * Wq + Wq + ALIGN, ALIGN)
        return cls(layer, False, S, na, nb, Hq, Wq, cs, aligned)

    @property
    def img_stride(self) -> int:
        return self.layer.cin * self.chan_stride

    def tap_offsets(self, column_shift: bool = True) -> torch.Tensor:
        """Offset of each kernel tap (r*Kw + s order) inside a channel's region; without
        ``column_shift``, the offset of the tap's row in its plane (the shift is ``s // S``)."""
        L, S = self.layer, self.S
        offs = [((r % S) * self.nb + (s % S)) * self.Hq * self.Wq + (r // S) * self.Wq
                + (s // S if column_shift else 0) for r in range(L.kh) for s in range(L.kw)]
        return torch.tensor(offs, dtype=torch.int64)

    def empty(self, n: int) -> torch.Tensor:
        if self.direct:
            return torch.zeros(n, self.layer.cin, self.layer.h, self.layer.w)
        return torch.zeros(n, self.img_stride)

    def fill(self, x: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        """Copy NCHW ``x`` into the interior of ``buf`` (its padding stays zero): one parallel
        pass in the C++ extension."""
        if self.direct:
            return x.contiguous()
        x = x.contiguous()
        n, c, h, w = x.shape
        if x.dtype != torch.float32 or buf.dtype != torch.float32 or not buf.is_contiguous() \
                or buf.numel() < n * c * self.chan_stride:
            raise ValueError(f"layout of {self.layer.shape_str}: float32 input and a contiguous "
                             f"float32 buffer of at least {n * c * self.chan_stride} floats")
        _ext.LAYOUT.call("sc_layout_fill", x.data_ptr(), n, c, h, w, buf.data_ptr(), self.S,
                         self.layer.padding, self.na, self.nb, self.Hq, self.Wq,
                         self.chan_stride, torch.get_num_threads())
        return buf

    def fill_reference(self, x: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        """``fill`` written with tensor slicing: the reference the C++ pass is tested against."""
        if self.direct:
            return x.contiguous()
        L, S, p = self.layer, self.S, self.layer.padding
        n = x.shape[0]
        body = buf.view(n, L.cin, self.chan_stride)
        planes = body[:, :, : self.na * self.nb * self.Hq * self.Wq].view(
            n, L.cin, self.na, self.nb, self.Hq, self.Wq)
        for a in range(self.na):
            i0 = max(0, -(-(p - a) // S))  # first plane row holding a real input row
            r0 = S * i0 + a - p
            ni = len(range(r0, L.h, S))
            for b in range(self.nb):
                j0 = max(0, -(-(p - b) // S))
                c0 = S * j0 + b - p
                nj = len(range(c0, L.w, S))
                planes[:, :, a, b, i0:i0 + ni, j0:j0 + nj].copy_(x[:, :, r0::S, c0::S])
        return buf

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return self.fill(x, self.empty(x.shape[0]))

    def destination(self) -> list[int]:
        """Where a producer writes pixel (oh, ow) of channel c of image n of this layer's input:
        ``[img, chan, base, row]`` with offset ``n*img + c*chan + base + oh*row + ow``; for a
        stride-S layout ``[img, chan, 0, Wq, S, na, nb, Hq*Wq, padding]``: padded pixel
        (oh+p, ow+p) goes to plane ((oh+p)%S, (ow+p)%S) at ((oh+p)//S, (ow+p)//S), and a pixel
        of a phase the layer does not read (a 1x1 stride-2 layer reads one) is not written."""
        L = self.layer
        if self.direct:
            return [L.cin * L.h * L.w, L.h * L.w, 0, L.w]
        p = L.padding
        if self.S != 1:
            return [self.img_stride, self.chan_stride, 0, self.Wq, self.S, self.na, self.nb,
                    self.Hq * self.Wq, p]
        return [self.img_stride, self.chan_stride, p * self.Wq + p, self.Wq]

    def geometry(self, n: int, cout: int, T: int, OB: int, chunk: int, split: str,
                 threads: int, out: list[int] | None = None, relu: bool = False) -> Geometry:
        """The kernel's geometry; ``out`` (a consumer's ``destination()``) redirects the output
        from NCHW."""
        L = self.layer
        out_img, out_chan, out_base, out_row, *phases = out or [cout * L.oh * L.ow,
                                                                L.oh * L.ow, 0, L.ow]
        return Geometry(n=n, cin=L.cin, cout=cout, chan_stride=self.chan_stride,
                        img_stride=self.img_stride, oh=L.oh, ow=L.ow, wq=self.Wq, tile=T, ob=OB,
                        chunk=chunk, split=0 if split == "pixels" else 1, threads=threads,
                        out_img=out_img, out_chan=out_chan, out_base=out_base, out_row=out_row,
                        relu=int(relu), **dict(zip(("out_s", "out_na", "out_nb", "out_plane",
                                                    "out_pad"), phases)))


def check_input(layer: ConvLayer, x: torch.Tensor, name: str) -> None:
    if x.dim() != 4 or x.shape[1:] != (layer.cin, layer.h, layer.w):
        raise ValueError(f"{name}: input shape {tuple(x.shape)} does not match layer "
                         f"{layer.shape_str} (expected [N, {layer.cin}, {layer.h}, {layer.w}])")
    if x.dtype != torch.float32:
        raise ValueError(f"{name}: float32 input expected, got {x.dtype}")


def square(v):
    """A square size (an int, or a pair of equal ints) as an int, else None."""
    if isinstance(v, int):
        return v
    return v[0] if len(set(v)) == 1 else None


def max_pool_args(pool) -> tuple[int, int, int] | None:
    """(kernel, stride, padding) of an ``nn.MaxPool2d`` the C++ passes take (a square window,
    no dilation, ceil_mode or indices, padding at most half the window), else None."""
    if not isinstance(pool, torch.nn.MaxPool2d) or pool.ceil_mode or pool.return_indices:
        return None
    k, s, pad, d = (square(v) for v in (pool.kernel_size, pool.stride or pool.kernel_size,
                                         pool.padding, pool.dilation))
    return (k, s, pad) if None not in (k, s, pad) and d == 1 and 2 * pad <= k else None


def max_pool_nchw(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """``F.max_pool2d(x, kernel, stride, padding)`` of a contiguous NCHW float32 CPU tensor in one
    parallel C++ pass. PyTorch's NCHW max-pool runs at a fraction of memory speed at batch 1
    (measured on a 2-core EPYC: 12.4 ms for VGG19's first pool, 1.7 ms in channels_last, where
    converting the input costs 7 ms); this one takes 2.4 ms (a row pass and a scan for NaN,
    which ``std::max`` would drop: a plane holding one is pooled again NaN-propagating)."""
    n, c, h, w = x.shape
    oh, ow = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
    if x.dtype != torch.float32 or not x.is_contiguous() or not x.is_cpu or oh < 1 or ow < 1 \
            or 2 * padding > kernel:
        raise ValueError(f"max_pool_nchw: a contiguous float32 CPU input and a valid window, "
                         f"got {tuple(x.shape)} {x.dtype}, kernel {kernel}, padding {padding}")
    y = torch.empty(n, c, oh, ow)
    _ext.LAYOUT.call("sc_max_pool_nchw", x.data_ptr(), n, c, h, w, kernel, stride, padding, oh,
                     ow, y.data_ptr(), torch.get_num_threads())
    return y


GEMV_MAX_ROWS = 8  # images a call of linear_gemv takes: each reads a weight block from the cache


def linear_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a few images (``x`` [M, K], M <= ``GEMV_MAX_ROWS``) in
    one parallel C++ pass over the weight, each block of its rows read from memory once for all
    M: PyTorch's batch-1 Linear reads a large weight below memory speed (VGG19's first
    classifier layer, 411 MB: 15 GB/s on a 2-core EPYC, where a plain pass reads 24 GB/s)."""
    n, k = weight.shape
    ok = x.dim() == 2 and 1 <= x.shape[0] <= GEMV_MAX_ROWS and x.shape[1] == k and all(
        t.dtype == torch.float32 and t.is_cpu and t.is_contiguous()
        for t in (x, weight, *([] if bias is None else [bias])))
    if not ok or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"linear_gemv: a contiguous float32 CPU [1..{GEMV_MAX_ROWS}, {k}] input, "
                         f"[{n}, {k}] weight and [{n}] bias, got {tuple(x.shape)} {x.dtype}")
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    _ext.LAYOUT.call("sc_linear_gemv", x.data_ptr(), weight.data_ptr(),
                     None if bias is None else bias.data_ptr(), y.data_ptr(), k, n, x.shape[0],
                     torch.get_num_threads())
    return y
