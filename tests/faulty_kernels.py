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
