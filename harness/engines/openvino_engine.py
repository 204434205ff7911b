"""OpenVINO on the CPU, in fp32 latency mode: ``INFERENCE_PRECISION_HINT=f32`` (it would use
bf16 on CPUs that have it), ``PERFORMANCE_HINT=LATENCY``, ``INFERENCE_NUM_THREADS`` = threads.
Also run on the masked network, as a control."""

from __future__ import annotations

from . import Engine, _onnx, register


class OpenVINO(Engine):
    name, label, masked, module = "openvino", "OpenVINO", "control", "openvino"
    install = "pip install '.[peers]' (openvino)"

    def version(self):
        return super().version().split("-")[0]  # 2026.4.1-22982-...: the release

    def settings(self, threads):
        return {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": threads, "device": "CPU"}

    def prepare(self, model, example, threads):
        import openvino as ov
        import torch

        config = {k: str(v) for k, v in self.settings(threads).items() if k != "device"}
        compiled = ov.Core().compile_model(_onnx.export(model, example), "CPU", config)
        req = compiled.create_infer_request()
        out = compiled.output(0)

        def run(t):
            return torch.from_numpy(req.infer({0: t.numpy()})[out].copy())

        return run


register(OpenVINO())
