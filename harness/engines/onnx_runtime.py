"""ONNX Runtime on the CPU: full graph optimisation, intra-op threads = threads, inter-op 1,
sequential execution. Also run on the masked network, as a control: does it gain from zeros?"""

from __future__ import annotations

from . import Engine, _onnx, register


class OnnxRuntime(Engine):
    name, label, masked, module = "onnxruntime", "ONNX Runtime", "control", "onnxruntime"
    install = "pip install '.[peers]' (onnxruntime)"

    def settings(self, threads):
        return {"graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": threads,
                "inter_op_num_threads": 1, "execution_mode": "ORT_SEQUENTIAL",
                "provider": "CPUExecutionProvider"}

    def prepare(self, model, example, threads):
        import onnxruntime as ort
        import torch

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        sess = ort.InferenceSession(_onnx.export(model, example), so,
                                    providers=["CPUExecutionProvider"])
        return lambda t: torch.from_numpy(sess.run(None, {"x": t.numpy()})[0])


register(OnnxRuntime())
