"""Stand-in whole-network engines for the tests (``HARNESS_PLUGINS=standin_engines``): one
that answers wrongly, one made artificially fast (it returns the answer it computed while
being prepared), one that is never installed, and one that reports a broken version."""

import torch

from harness import engines


class Wrong(engines.Engine):
    name, label, masked, default = "standin_wrong", "wrong stand-in", "control", False

    def prepare(self, model, example, threads):
        return lambda t: model(t) * 1.01  # 1% off: far outside the 1e-4 gate


class Fast(engines.Engine):
    name, label, default = "standin_fast", "artificially fast stand-in", False

    def prepare(self, model, example, threads):
        with torch.inference_mode():
            y = model(example)
        return lambda t: y  # no work at all: faster than any real engine


class Missing(engines.Engine):
    name, label, masked, default = "standin_missing", "never installed", "peer", False
    install = "pip install standin-missing"

    def available(self):
        return f"standin_missing is not installed ({self.install})"


for e in (Wrong(), Fast(), Missing()):
    engines.register(e)
