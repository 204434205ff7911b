"""Plugin kernels for the confirmation pass, loaded with HARNESS_PLUGINS=lucky_kernels: a row
measured in a lucky moment, and an honest one. Both are the masked weight through torch's own
convolution (correct, with the pattern they claim); delays are far above any machine noise.

- ``test_lucky``: no delay in the first process that prepares it (the sweep's worker), 20 ms
  per call in every later one (the confirmation race's worker): its sweep row is the layer's
  best and would not hold when timed again. ``LUCKY_STATE`` names the file that remembers.
- ``test_steady``: 2 ms per call, always: slower than the lucky row in the sweep, faster than
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
        state = os.environ["LUCKY_STATE"]
        mine = str(os.getpid())
        if not os.path.exists(state):
            with open(state, "w") as f:
                f.write(mine)
        with open(state) as f:
            return 0.0 if f.read() == mine else 0.02


@register
class Steady(_Delayed):
    name = "test_steady"

    def delay(self) -> float:
        return 0.002
