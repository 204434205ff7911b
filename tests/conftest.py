import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# test files run in parallel on a few cores: every timed round would count the other files as
# contention and be retaken; the retake logic has its own tests (test_contention.py), fed
# recorded readings. Commands the tests start inherit this.
os.environ.setdefault("SPARSECONV_MAX_CONTENTION", "off")
os.environ["SPARSECONV_NICE"] = "off"  # the suite never outranks the desktop
# Triton kernels run on CPU tensors through the interpreter (read when @triton.jit decorates, so
# it must be set before kernels.triton_kernels is imported), except with
# SPARSECONV_TEST_DEVICE=cuda on a GPU machine: then tests/test_kernels_triton.py compiles and
# runs every kernel on the GPU for real (`nox -s gpu`); the other test files assume the
# interpreter and are not run that way.
TEST_DEVICE = os.environ.get("SPARSECONV_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cuda":
    os.environ.pop("TRITON_INTERPRET", None)
    if not torch.cuda.is_available():
        raise pytest.UsageError("SPARSECONV_TEST_DEVICE=cuda: no CUDA device on this machine")
else:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def planar_cs(monkeypatch):
    """CS networks on the planar kernel (cs_cpu_direct) in this process: the channels-last one
    (cs_cpu_nhwc) ranks first where it runs, and hands no planar layout over; tests of the
    planar layouts and their handover take this."""
    import kernels

    monkeypatch.setattr(kernels.get("cs_cpu_nhwc"), "default_rank", 2)


@pytest.fixture
def cli(capsys):
    """Run ``python -m harness ARGS`` in this process: (exit code, stdout, stderr). For checks
    that end before any work starts (usage errors, refusals): no interpreter start-up, no torch
    import, per call; a test of what a real process does (signals, exit on a traceback) starts
    one instead."""
    from harness.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run
