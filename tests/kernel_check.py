"""Shared correctness check: a kernel's run against F.conv2d in float64 on run.masked_weight."""

import torch
import torch.nn.functional as F

import kernels
from shapes import ConvLayer

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def layer(cin, cout, k, stride=1, padding=0, h=9, w=None, name="t"):
    return ConvLayer(net="test", name=name, index=0, cin=cin, cout=cout, kh=k, kw=k,
                     stride=stride, padding=padding, h=h, w=w or h)


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def check(kernel_name, lay, sparsity, config=None, batch=2, seed=0):
    """Prepare, run end-to-end into a NaN-poisoned output and through the resident path, and
    return the worst relative error against the float64 reference (plus the run)."""
    g = torch.Generator().manual_seed(seed)
    k = kernels.get(kernel_name)
    w = torch.randn(lay.cout, lay.cin, lay.kh, lay.kw, generator=g)
    run = k.prepare(lay, w, sparsity, config)
    x = torch.randn(batch, lay.cin, lay.h, lay.w, generator=g)
    ref = F.conv2d(x.double(), run.masked_weight.double(), stride=lay.stride,
                   padding=lay.padding)
    out = torch.full(ref.shape, float("nan"))
    y = run(x, out=out)
    errs = [rel_err(y, ref), rel_err(run(x), ref)]
    if run.has_resident:
        errs.append(rel_err(run.resident(run.layout(x)), ref))
    return max(errs), run
