"""Dense baselines: torch's conv2d (oneDNN on the CPU, cuDNN on the GPU), NCHW and
channels_last. The speedup baseline is the faster layout, measured, not assumed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Kernel, Run, register


def _conv_run(layer, weight, layout):
    cl = layout == "channels_last"
    w = weight.contiguous(memory_format=torch.channels_last) if cl else weight.contiguous()
    kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
              groups=layer.groups)

    def resident(xl, out=None):
        y = F.conv2d(xl, w, **kw)
        return y if out is None else out.copy_(y)

    def to_layout(x):
        return x.contiguous(memory_format=torch.channels_last) if cl else x.contiguous()

    def call(x, out=None):
        y = F.conv2d(to_layout(x), w, **kw)
        if cl:
            y = y.contiguous()
        return y if out is None else out.copy_(y)

    return Run(weight, call, layout=to_layout, resident=resident, info={"layout": layout})


class _Dense(Kernel):
    pattern = "dense"
    baseline = True
    grouped = True
    dilated = True
    space = {"layout": ("nchw", "channels_last")}

    def _prepare(self, layer, weight, sparsity, config):
        return _conv_run(layer, weight, config["layout"])


@register
class DenseCpu(_Dense):
    """torch.nn.functional.conv2d on the CPU (oneDNN)."""

    name = "dense_cpu"
    device = "cpu"
    dtypes = ("float32", "bfloat16")


@register
class DenseCudnn(_Dense):
    """conv2d on the GPU through cuDNN; the harness sets cudnn.benchmark and disables TF32."""

    name = "dense_cudnn"
    device = "cuda"
    dtypes = ("float32", "float16", "bfloat16")


def _with_tf32(fn):
    """``fn`` with cuDNN's TF32 on for the call (and for a CUDA graph captured around it)."""
    if fn is None:
        return None

    def call(x, out=None):
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = True
        try:
            return fn(x, out)
        finally:
            torch.backends.cudnn.allow_tf32 = old

    return call


@register
class DenseCudnnTF32(_Dense):
    """cuDNN in fp32 with TF32 on, PyTorch's default for convolutions: a column beside the fp32
    rows, never the baseline (the papers, and the harness, compare with TF32 off). TF32 rounds
    the operands to a 10-bit mantissa, so its gate has fp16's tolerance."""

    name = "dense_cudnn_tf32"
    device = "cuda"
    dtypes = ("float32",)
    baseline = False
    tolerance = {"float32": 5e-3}

    def _prepare(self, layer, weight, sparsity, config):
        run = _conv_run(layer, weight, config["layout"])
        return Run(weight, _with_tf32(run), layout=run.layout,
                   resident=_with_tf32(run.resident), info={**run.info, "tf32": True})
