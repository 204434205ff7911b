"""A dense convolution with few input channels, its bias and ReLU, and the max-pool after it,
in one C++ pass that writes the pooled output channels-last (``csrc/stem.cpp``): a network's
stem (ResNet's 7x7 stride-2 3->64 convolution, ReLU, 3x3 stride-2 max-pool) as one operation,
whose full-size convolution output never leaves the cache.

``harness.sparse_model`` runs a stem through it where ``sparsify`` measured the pass faster
than the three operations on the layer's input (``ConvPool``); ``why_not(conv, pool)`` says why
a pair cannot.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from . import _ext
from .cpu_layout import max_pool_args, square
from .registry import KernelBuildError

_FIELDS = ("n", "cin", "h", "w", "cout", "k", "stride", "pad", "oh", "ow",
           "pk", "ps", "ppad", "ph", "pw", "relu", "threads", "bands")


class StemGeometryC(ctypes.Structure):
    _fields_ = [(name, _ext.I64) for name in _FIELDS]


STEM = _ext.Family("stem", "stem.cpp", {
    # geometry, x, padded-copy scratch, packed weight, bias, y
    "sc_stem_conv_pool": [ctypes.POINTER(StemGeometryC), _ext.P, _ext.P, _ext.P, _ext.P, _ext.P]})

MAX_CIN = 8  # a stem's few input channels: every input value is broadcast once per tile


def why_not(conv: nn.Module, pool: nn.Module) -> str | None:
    """Why ``conv`` followed by ``pool`` cannot run as one pass here, or None when it can."""
    if not isinstance(conv, nn.Conv2d) or not isinstance(pool, nn.MaxPool2d):
        return "not a Conv2d followed by a MaxPool2d"
    if conv.groups != 1 or square(conv.dilation) != 1 or conv.padding_mode != "zeros" \
            or isinstance(conv.padding, str) or None in (square(conv.kernel_size),
                                                         square(conv.stride), square(conv.padding)):
        return "the convolution is not square, ungrouped and undilated with zero padding"
    if conv.in_channels > MAX_CIN:
        return f"{conv.in_channels} input channels (the pass is for at most {MAX_CIN})"
    if conv.out_channels % _ext.lanes():
        return f"{conv.out_channels} output channels are not a multiple of {_ext.lanes()}"
    if conv.weight.dtype != torch.float32 or not conv.weight.is_cpu:
        return "not a float32 CPU convolution"
    if max_pool_args(pool) is None:
        return "the max-pool is not square, undilated, without ceil_mode or indices"
    return None


@functools.cache
def available() -> bool:
    """Whether the pass builds and loads here (a failed build is a fallback, not an error)."""
    try:
        STEM.load()
    except KernelBuildError:
        return False
    return True


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[cout, cin, k, k] -> [k, cin, k, cout], as the pass reads it."""
    return weight.detach().permute(2, 1, 3, 0).contiguous()


def conv_pool(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, k: int,
              stride: int, pad: int, pool: tuple[int, int, int], relu: bool) -> torch.Tensor:
    """``max_pool2d(relu?(conv2d(x, w, bias, stride, pad)), *pool)`` for a float32 CPU ``x``
    [N, cin, H, W] (any layout), ``packed`` = ``pack_weight(w)``; the result is channels-last."""
    n, cin, h, w = x.shape
    cout = packed.shape[-1]
    if packed.shape != (k, cin, k, cout) or x.dtype != torch.float32 or not x.is_cpu:
        raise ValueError(f"conv_pool: a float32 CPU input with {packed.shape[1]} channels, "
                         f"got {tuple(x.shape)} {x.dtype}")
    if packed.dtype != torch.float32 or not packed.is_contiguous() or not packed.is_cpu or (
            bias is not None and (bias.dtype != torch.float32 or bias.shape != (cout,)
                                  or not bias.is_cpu)):
        raise ValueError(f"conv_pool: a contiguous float32 CPU weight packed by pack_weight and "
                         f"a float32 [{cout}] bias")
    pk, ps, ppad = pool
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    ph, pw = (oh + 2 * ppad - pk) // ps + 1, (ow + 2 * ppad - pk) // ps + 1
    if oh < 1 or ow < 1 or ph < 1 or pw < 1:
        raise ValueError(f"conv_pool: input {h}x{w} is too small for a {k}x{k} convolution "
                         f"and a {pk}x{pk} pool")
    f32 = torch.float32
    y = torch.empty(n, ph, pw, cout, dtype=f32).permute(0, 3, 1, 2)
    if n == 0:
        return y
    x = x.contiguous()
    b = torch.zeros(cout, dtype=f32) if bias is None else bias.detach().contiguous()
    scratch = torch.empty(n * cin * (h + 2 * pad) * (w + 2 * pad), dtype=f32)
    threads = torch.get_num_threads()
    # one image's pool rows split among the threads when the images alone would leave some idle
    bands = 1 if n % threads == 0 else min(ph, threads)
    geo = StemGeometryC(n, cin, h, w, cout, k, stride, pad, oh, ow, pk, ps, ppad, ph, pw,
                        int(relu), threads, bands)
    STEM.call("sc_stem_conv_pool", ctypes.byref(geo), x.data_ptr(), scratch.data_ptr(),
              packed.data_ptr(), b.data_ptr(), y.data_ptr())
    return y
