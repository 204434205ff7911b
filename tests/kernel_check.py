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


def grid(**axes):
    """Parameters over the product of ``axes`` (name -> values) for ``parametrize``: a core
    that every ``nox -s tests`` runs, where each value of every axis appears at least once (the
    i-th value of the first axis with value (i + k) of the k-th axis, wrapping), and the rest of
    the product marked slow (CI runs it all). Returns (argnames, params)."""
    import itertools

    import pytest

    names = list(axes)
    values = [list(v) for v in axes.values()]
    first = len(values[0])
    span = max(len(v) for v in values)
    core = set()
    for i in range(span):  # enough rows that the longest axis is covered too
        core.add(tuple((i + k) % len(v) for k, v in enumerate(values)))
    params = []
    for idx in itertools.product(*(range(len(v)) for v in values)):
        combo = tuple(v[j] for v, j in zip(values, idx))
        marks = () if idx in core else (pytest.mark.slow,)
        params.append(pytest.param(*combo, marks=marks, id="-".join(map(_pid, combo))))
    assert first
    return ",".join(names), params


def _pid(v) -> str:
    if isinstance(v, tuple):
        return "{}->{} {}x{} s{} p{} {}x{}".format(v[0], v[1], v[2], v[2], *v[3:]) \
            if len(v) == 7 else "x".join(map(str, v))
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in v.items())
    return str(v)
