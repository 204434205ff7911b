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
