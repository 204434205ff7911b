"""DeepSparse (Neural Magic), the general unstructured-sparsity CPU engine: run on the dense
network and, as the sparse peer, on the very masked network the project's kernels compute
(exported through ONNX), ``num_cores`` = threads. End-of-life since 1.8.0 (the last release
with wheels: CPython up to 3.11), under its own community licence."""

from __future__ import annotations

import os

from . import Engine, _onnx, register


class DeepSparse(Engine):
    name, label, masked, module = "deepsparse", "DeepSparse", "peer", "deepsparse"
    install = "pip install '.[deepsparse]' (Python <= 3.11)"

    def available(self):
        os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # no network calls from a benchmark
        try:
            return super().available()
        except Exception as e:  # noqa: BLE001 - e.g. an unsupported CPU or numpy
            return f"deepsparse cannot be loaded here: {type(e).__name__}: {e}"[:200]

    def settings(self, threads):
        return {"num_cores": threads, "batch_size": "the run's batch"}

    def prepare(self, model, example, threads):
        import deepsparse
        import torch

        eng = deepsparse.compile_model(_onnx.export(model, example),
                                       batch_size=example.shape[0], num_cores=threads)
        return lambda t: torch.from_numpy(eng.run([t.numpy()])[0])


register(DeepSparse())
