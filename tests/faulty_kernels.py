"""Deliberately broken kernels, loaded into the harness with HARNESS_PLUGINS=faulty_kernels, to
prove that failures become typed records and the sweep goes on."""

import os
import time

import torch.nn.functional as F

from kernels import Kernel, Run, register


class _Faulty(Kernel):
    pattern = "unstructured"
    device = "cpu"
    space = {"variant": (0,)}

    def _prepare(self, layer, weight, sparsity, config):
        wm = self.make_pattern(sparsity, config).apply(weight)

        def call(x, out=None):
            y = self.misbehave(F.conv2d(x, wm, stride=layer.stride, padding=layer.padding))
            return y if out is None else out.copy_(y)

        return Run(wm, call)


@register
class FaultyRaise(_Faulty):
    name = "faulty_raise"

    def misbehave(self, y):
        raise RuntimeError("deliberate failure inside run")


@register
class FaultyWrong(_Faulty):
    name = "faulty_wrong"

    def misbehave(self, y):
        return y * 1.01


@register
class FaultyHang(_Faulty):
    name = "faulty_hang"

    def misbehave(self, y):
        while True:
            time.sleep(1)


@register
class FaultyCrash(_Faulty):
    name = "faulty_crash"

    def misbehave(self, y):
        os._exit(3)


@register
class FaultyPrepare(_Faulty):
    name = "faulty_prepare"

    def _prepare(self, layer, weight, sparsity, config):
        raise ValueError("cannot encode this weight")


@register
class FaultyIgnoresOut(_Faulty):
    """Right values, but returned in a new tensor instead of the ``out`` it was given."""

    name = "faulty_ignores_out"

    def _prepare(self, layer, weight, sparsity, config):
        wm = self.make_pattern(sparsity, config).apply(weight)
        return Run(wm, lambda x, out=None: F.conv2d(x, wm, stride=layer.stride,
                                                    padding=layer.padding))


@register
class FaultyDenseClaimsCS(Kernel):
    """Claims CS but computes with its dense weight: the arithmetic agrees with the reference on
    ``masked_weight``, only the pattern check can tell."""

    name = "faulty_dense_claims_cs"
    pattern = "cs"
    device = "cpu"
    space = {"M": (2,)}
    pattern_params = ("M",)

    def _prepare(self, layer, weight, sparsity, config):
        def call(x, out=None):
            y = F.conv2d(x, weight, stride=layer.stride, padding=layer.padding)
            return y if out is None else out.copy_(y)

        return Run(weight, call)


@register
class FaultyZeroOne(_Faulty):
    """Zeroes one output element."""

    name = "faulty_zero_one"

    def misbehave(self, y):
        y[0, 0, y.shape[2] // 2, y.shape[3] // 2] = 0.0
        return y


@register
class FaultyDropTerm(_Faulty):
    """Drops one kept weight's term at one output pixel."""

    name = "faulty_drop_term"

    def _prepare(self, layer, weight, sparsity, config):
        wm = self.make_pattern(sparsity, config).apply(weight)
        o, c, r, s = (int(v) for v in wm.nonzero()[0])
        oh, ow = layer.oh // 2, layer.ow // 2
        ih, iw = oh * layer.stride - layer.padding + r, ow * layer.stride - layer.padding + s

        def call(x, out=None):
            y = F.conv2d(x, wm, stride=layer.stride, padding=layer.padding)
            if 0 <= ih < layer.h and 0 <= iw < layer.w:
                y[:, o, oh, ow] -= wm[o, c, r, s] * x[:, c, ih, iw]
            return y if out is None else out.copy_(y)

        return Run(wm, call)
