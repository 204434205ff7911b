"""Plugin kernels for the confirmation pass, loaded with HARNESS_PLUGINS=lucky_kernels: a row
measured in a lucky moment, and an honest one. Both are the masked weight through torch's own
convolution (correct, with the pattern they claim); delays are far above any machine noise.

- ``test_lucky``: no delay the first time it is prepared (the sweep), 40 ms per call every
  later time (the confirmation race): its sweep row is the layer's best and would not hold when
  timed again. ``LUCKY_STATE`` names the file that remembers.
- ``test_steady``: 4 ms per call, always: slower than the lucky row in the sweep, faster than
  it in the race.
"""

import os
import time

import torch.nn.functional as F

from kernels import Kernel, Run, register


class _Delayed(Kernel):
    pattern = "unstructured"
    device = "cpu"
    space = {"variant": (0,)}

    def delay(self) -> float:
        raise NotImplementedError

    def _prepare(self, layer, weight, sparsity, config):
        wm = self.make_pattern(sparsity, config).apply(weight)
        pause = self.delay()

        def call(x, out=None):
            if pause:
                time.sleep(pause)
            y = F.conv2d(x, wm, stride=layer.stride, padding=layer.padding)
            return y if out is None else out.copy_(y)

        return Run(wm, call)


@register
class Lucky(_Delayed):
    name = "test_lucky"

    def delay(self) -> float:
        try:  # the first prepare anywhere creates the file: no delay; every later one finds it
            os.close(os.open(os.environ["LUCKY_STATE"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return 0.0
        except FileExistsError:
            return 0.04


@register
class Steady(_Delayed):
    name = "test_steady"

    def delay(self) -> float:
        return 0.004
