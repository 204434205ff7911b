import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# Triton kernels run on CPU tensors through the interpreter (read when @triton.jit decorates, so
# it must be set before kernels.triton_kernels is imported).
os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
