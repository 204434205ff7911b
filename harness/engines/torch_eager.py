"""PyTorch itself: eager NCHW, eager channels_last, and ``torch.compile`` (on request: slow to
build). The dense baselines every earlier figure was against."""

from __future__ import annotations

import copy

import torch

from . import Engine, register


class EagerNCHW(Engine):
    name, label, module = "eager_nchw", "PyTorch eager (NCHW)", "torch"

    def settings(self, threads: int) -> dict:
        return {"torch.set_num_threads": threads}

    def prepare(self, model, example, threads):
        torch.set_num_threads(threads)
        return model


class EagerChannelsLast(EagerNCHW):
    name, label = "eager_channels_last", "PyTorch eager (channels_last)"

    def prepare(self, model, example, threads):
        torch.set_num_threads(threads)
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        return lambda t: cl(t.contiguous(memory_format=torch.channels_last))


class Compiled(EagerNCHW):
    name, label, default = "torch_compile", "torch.compile (inductor)", False

    def prepare(self, model, example, threads):
        torch.set_num_threads(threads)
        fn = torch.compile(model)
        with torch.inference_mode():
            fn(example)
        return fn


register(EagerNCHW())
register(EagerChannelsLast())
register(Compiled())
