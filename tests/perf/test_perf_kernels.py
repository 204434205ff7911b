"""pytest-benchmark regression suite for key kernels (``nox -s perf``): saved baselines and
``--benchmark-compare`` show a slowdown before it lands. Not part of the test run (marker)."""

import pytest
import torch

import kernels
import shapes

pytestmark = pytest.mark.perf

LAYERS = {lay.name: lay for lay in shapes.unique(shapes.load("resnet50"))}
CASES = [("dense_cpu", "layer2.0.conv2", 0.9375, {"layout": "nchw"}),
         ("cs_cpu_direct", "layer1.0.conv3", 0.9375, None),
         ("cs_cpu_direct", "layer2.0.conv2", 0.9375, None),
         ("cs_cpu_direct", "layer4.0.conv2", 0.9375, None),
         ("bsr_1xn_cpu", "layer4.0.conv2", 0.9375, None),
         ("cci_cpu", "layer3.1.conv2", 0.75, None)]


@pytest.mark.parametrize("kernel,layer,S,cfg", CASES, ids=[f"{k}-{lay}-{s}" for k, lay, s, _
                                                            in CASES])
def test_kernel_speed(benchmark, kernel, layer, S, cfg):
    torch.set_num_threads(2)
    lay = LAYERS[layer]
    g = torch.Generator().manual_seed(0)
    run = kernels.get(kernel).prepare(lay, torch.randn(lay.cout, lay.cin, lay.kh, lay.kw,
                                                       generator=g), S, cfg)
    x = torch.randn(1, lay.cin, lay.h, lay.w, generator=g)
    benchmark.extra_info.update(flops=lay.flops(1), sparsity=S)
    y = benchmark(run, x)
    assert y.shape == (1, lay.cout, lay.oh, lay.ow)
