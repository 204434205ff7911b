"""The ONNX file the exported engines share: one export per model and input shape (and per
process), into a temporary folder removed by ``cleanup`` (at the end of each e2e case, and at
exit: the worker ends with ``os._exit``, which runs no exit handler, and left a folder of up to
2.4 GB per run behind)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import warnings
from pathlib import Path

_FILES: dict = {}
_DIR: list[Path] = []


def export(model, example) -> str:
    """Path of ``model`` exported for inputs shaped as ``example`` (opset 17, static shapes,
    input ``x``, output ``y``)."""
    import torch

    key = (id(model), tuple(example.shape))
    if key in _FILES and _FILES[key][0] is model:
        return _FILES[key][1]
    if not _DIR:
        _DIR.append(Path(tempfile.mkdtemp(prefix="sparseconv-onnx-")))
        atexit.register(cleanup)
    path = str(_DIR[0] / f"model{len(_FILES)}.onnx")
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model.eval(), (example,), path, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    _FILES[key] = (model, path)
    return path


def cleanup() -> None:
    """Remove the exported files (the engines built from them have read them already)."""
    for d in _DIR:
        shutil.rmtree(d, True)
    _DIR.clear()
    _FILES.clear()
