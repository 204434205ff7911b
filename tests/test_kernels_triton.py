"""Triton kernels against the float64 reference: through the interpreter on CPU tensors
(TRITON_INTERPRET=1, set in conftest), or compiled and run on the GPU with
SPARSECONV_TEST_DEVICE=cuda (`nox -s gpu`); and the ahead-of-time compile for sm_80 / sm_90."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TEST_DEVICE
from kernel_check import grid, layer

import kernels

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
GEOMS = [(16, 32, 3, 2, 1, 9, 11), (32, 32, 1, 1, 0, 7, 5), (16, 64, 3, 1, 1, 6, 7),
         (8, 16, 7, 2, 3, 11, 9)]


def run_check(name, geom, S, cfg, dtype, batch=2):
    lay = layer(*geom[:5], h=geom[5], w=geom[6])
    k = kernels.get(name)
    why = k.supports(lay, S, cfg, {torch.float32: "float32", torch.float16: "float16"}[dtype])
    if why:
        return why
    g = torch.Generator().manual_seed(1)
    w = torch.randn(lay.cout, lay.cin, lay.kh, lay.kw, generator=g).to(dtype).to(TEST_DEVICE)
    x = torch.randn(batch, lay.cin, lay.h, lay.w, generator=g).to(dtype).to(TEST_DEVICE)
    run = k.prepare(lay, w, S, cfg)
    out = torch.full((batch, lay.cout, lay.oh, lay.ow), float("nan"), dtype=dtype,
                     device=TEST_DEVICE)
    y = run(x, out=out).cpu()
    x, mw = x.cpu(), run.masked_weight.cpu()
    ref = F.conv2d(x.double(), mw.double(), stride=lay.stride, padding=lay.padding)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], (name, geom, S, cfg, dtype, err)
    return None


DTYPES = [torch.float32, torch.float16]
# Each grid's core (every value of every axis at least once) runs in `nox -s tests`; the rest of
# the product is marked slow (CI, and `nox -s gpu` on a GPU, run it all).


@pytest.mark.parametrize(*grid(geom=GEOMS, dtype=DTYPES, cfg=[
    {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2},
    {"BM": 128, "BN": 128, "num_warps": 8, "num_stages": 3}]))
def test_dense_triton_implicit_gemm(geom, dtype, cfg):
    assert run_check("dense_triton_implicit_gemm", geom, 0.0, cfg, dtype) is None


@pytest.mark.parametrize(*grid(geom=GEOMS, S=[0.5, 0.75, 0.875, 0.9375], dtype=DTYPES))
def test_cs_triton_weight_reuse(geom, S, dtype):
    cfg = {"BM": 32, "BN": 32} if S in (0.5, 0.875) else {"BM": 64, "BN": 64, "num_stages": 2}
    why = run_check("cs_triton_weight_reuse", geom, S, cfg, dtype)
    assert why is None or "divisible" in why  # Cin*Kh*Kw must split into K groups


@pytest.mark.parametrize(*grid(geom=GEOMS, S=[0.5, 0.9375], dtype=DTYPES, cfg=[
    {"BM": 16, "BN": 16, "num_warps": 2, "UNROLL": 1, "SPLIT": 1},
    {"BM": 128, "BN": 64, "num_warps": 4, "UNROLL": 4, "SPLIT": 1},
    {"BM": 32, "BN": 16, "num_warps": 2, "UNROLL": 4, "SPLIT": 4}]))
def test_cs_triton_direct(geom, S, dtype, cfg):
    why = run_check("cs_triton_direct", geom, S, {**cfg, "num_stages": 1}, dtype, batch=3)
    assert why is None or "divisible" in why


@pytest.mark.parametrize(*grid(geom=GEOMS[:3], V=[16, 32, 64],
                              SPB=[(0.5, False, 16), (0.9, True, 32), (0.75, True, 16)],
                              dtype=DTYPES))
def test_ovw_triton_feature_reuse(geom, V, SPB, dtype):
    S, permute, BK = SPB
    why = run_check("ovw_triton_feature_reuse", geom, S,
                    {"V": V, "permute": permute, "BK": BK}, dtype)
    if why:
        assert "V=" in why and V > geom[1] or geom[1] % V


@pytest.mark.parametrize(*grid(geom=GEOMS[:3], N=[4, 8, 16, 32],
                              SR=[(0.75, False), (0.9375, True)], dtype=DTYPES))
def test_bsr_1xn_triton(geom, N, SR, dtype):
    S, rearrange = SR
    why = run_check("bsr_1xn_triton", geom, S, {"N": N, "rearrange": rearrange, "BK": 16},
                    dtype, batch=1)
    assert why is None


def test_triton_kernels_registered_with_config_spaces():
    for name in ("cs_triton_weight_reuse", "cs_triton_direct", "ovw_triton_feature_reuse",
                 "bsr_1xn_triton",
                 "dense_triton_implicit_gemm", "dense_cudnn"):
        assert kernels.get(name).device == "cuda"
    assert kernels.get("ovw_triton_feature_reuse").space["V"] == (16, 32, 64)
    assert {"BM", "BN", "num_warps", "num_stages"} <= set(kernels.get("cs_triton_weight_reuse")
                                                          .space)


def test_without_gpu_or_interpreter_cuda_kernels_say_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lay = layer(16, 32, 3, 1, 1)
    for name in ("cs_triton_weight_reuse", "dense_cudnn"):
        assert kernels.get(name).supports(lay, 0.5) == "no CUDA device on this machine"


AOT_SCRIPT = """
import json, sys
from harness import aot
df = aot.compile_all(archs=(80, 90), sample=True)
print(df.to_json(orient="records"))
"""


@pytest.mark.slow
def test_ahead_of_time_compile_sample_for_sm80_and_sm90():
    import json
    import os
    import subprocess
    import sys

    import pandas as pd
    from test_harness import ROOT

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real compiles
    r = subprocess.run([sys.executable, "-c", AOT_SCRIPT], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.DataFrame(json.loads(r.stdout.strip().splitlines()[-1]))
    assert set(df.kernel) == {"cs_triton_weight_reuse", "cs_triton_direct", "ovw_triton_feature_reuse",
                              "bsr_1xn_triton", "dense_triton_implicit_gemm"}
    assert (df.status == "ok").all(), df[df.status != "ok"].to_string()
    assert (df.registers > 0).all()
    dots = df[~df.kernel.str.startswith("cs_triton")]
    assert (dots.shared > 0).all()  # tl.dot operands staged in shared memory
    assert set(df.arch) == {80, 90}


def test_dense_triton_control_is_channels_last_and_1x1_is_a_matrix_product():
    """inductor's template: channels_last in (and out on the kernel-only path), a 1x1
    stride-1 layer as a plain matrix product; both paths match the reference."""
    for geom, matmul in (((32, 32, 1, 1, 0, 7, 5), True), ((16, 32, 3, 2, 1, 9, 11), False),
                         ((32, 16, 1, 2, 0, 8, 8), False)):
        lay = layer(*geom[:5], h=geom[5], w=geom[6])
        k = kernels.get("dense_triton_implicit_gemm")
        g = torch.Generator().manual_seed(2)
        w = torch.randn(lay.cout, lay.cin, lay.kh, lay.kw, generator=g).to(TEST_DEVICE)
        x = torch.randn(2, lay.cin, lay.h, lay.w, generator=g).to(TEST_DEVICE)
        run = k.prepare(lay, w, 0.0, {"BM": 64, "BN": 64, "BK": 32})
        assert run.info["matmul"] is matmul
        xl = run.layout(x)
        assert xl.is_contiguous(memory_format=torch.channels_last)
        y = run.resident(xl)
        assert y.is_contiguous(memory_format=torch.channels_last)
        ref = F.conv2d(x.cpu().double(), w.cpu().double(), stride=lay.stride,
                       padding=lay.padding)
        for got in (y, run(x)):
            assert ((got.cpu().double() - ref).norm() / ref.norm()).item() < TOL[torch.float32]


def test_cs_triton_direct_reads_the_unpadded_input(monkeypatch):
    """No per-call F.pad: a padded layer masks the taps outside the image in the kernel."""
    def no_pad(*a, **k):
        raise AssertionError("cs_triton_direct padded its input inside the timed call")

    monkeypatch.setattr(F, "pad", no_pad)
    for cfg in ({"SPLIT": 1}, {"SPLIT": 4, "BM": 16, "BN": 16, "num_warps": 2}):
        assert run_check("cs_triton_direct", (16, 32, 3, 1, 1, 6, 7), 0.9375,
                         {"UNROLL": 4, **cfg}, torch.float32, batch=2) is None
