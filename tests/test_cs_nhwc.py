"""cs_cpu_nhwc (CS over channels-last activations, 16 filters per vector) against F.conv2d in
float64 on run.masked_weight, its epilogue, its limits, and its place in a sparse network."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from kernel_check import check, grid, layer, rel_err

import kernels
from kernels import _ext
from kernels import patterns as P

NAME = "cs_cpu_nhwc"
GEOMETRIES = [  # (cin, cout, k, stride, padding, h, w)
    (64, 32, 1, 1, 0, 13, 17),
    (64, 48, 1, 2, 0, 13, 17),
    (32, 16, 3, 1, 1, 13, 17),
    (128, 64, 3, 2, 1, 15, 15),
    (32, 16, 5, 2, 2, 21, 19),
    (64, 32, 3, 1, 0, 9, 11),
]
needs_avx512 = pytest.mark.skipif(not _ext.avx512(), reason="cs_cpu_nhwc needs AVX-512; "
                                  "test_without_avx512_the_kernel_says_why covers this machine")


def test_without_avx512_the_kernel_says_why():
    why = kernels.get(NAME).available()
    assert (why is None) == _ext.avx512()
    if why:
        assert "AVX-512" in why


@needs_avx512
@pytest.mark.parametrize(*grid(geom=GEOMETRIES, S=[0.5, 0.75, 0.875, 0.9375],
                              tile=["2x8", "2x12", "3x7", "4x5"], batch=[1, 3]))
def test_cs_nhwc_matches_reference_and_keeps_the_cs_pattern(geom, S, tile, batch):
    lay = layer(*geom[:5], h=geom[5], w=geom[6])
    err, run = check(NAME, lay, S, {"tile": tile}, batch=batch)
    assert err < 1e-5
    assert P.make("cs", S, form="cin", M=1).conforms(run.masked_weight)
    x = torch.randn(batch, lay.cin, lay.h, lay.w)
    assert run(x).is_contiguous()  # NCHW out, as every kernel's run
    assert run.fused(x).is_contiguous(memory_format=torch.channels_last)


@needs_avx512
def test_it_writes_every_output_element_in_place_or_through_a_copy():
    """A channels-last out is written in place; any other out (NCHW) through a channels-last
    copy of it, so an element the kernel missed keeps the NaN it was poisoned with; an empty
    batch writes nothing and fails nothing."""
    lay = layer(64, 48, 3, 2, 1, h=13, w=17)
    run = kernels.get(NAME).prepare(lay, torch.randn(48, 64, 3, 3), 0.9375)
    x = torch.randn(2, 64, 13, 17)
    ref = F.conv2d(x.double(), run.masked_weight.double(), stride=2, padding=1)
    for fmt in (torch.channels_last, torch.contiguous_format):
        out = torch.full((2, 48, lay.oh, lay.ow), float("nan")).contiguous(memory_format=fmt)
        assert run.resident(run.layout(x), out=out) is out and not out.isnan().any()
        assert rel_err(out, ref) < 1e-5
    empty = run(torch.randn(0, 64, 13, 17))
    assert empty.shape == (0, 48, lay.oh, lay.ow)
    with pytest.raises(ValueError, match="float32 input expected"):
        run(x.double())
    with pytest.raises(ValueError, match="does not match"):
        run(torch.randn(2, 32, 13, 17))


@needs_avx512
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("res_layout", [torch.contiguous_format, torch.channels_last])
def test_epilogue_adds_bias_and_residual_then_relu(relu, res_layout):
    """bias, then the residual (NCHW or channels-last: read as channels-last), then ReLU, all
    in the kernel; a partial last pixel block (7x5 = 35 pixels) and a filter group left over
    (Cout 80: 5 blocks of 16 in groups of 2 and of 4) are written whole and nothing else."""
    lay = layer(64, 80, 3, 1, 1, h=7, w=5)
    g = torch.Generator().manual_seed(3)
    for tile in ("2x8", "4x5"):
        run = kernels.get(NAME).prepare(lay, torch.randn(80, 64, 3, 3, generator=g), 0.9375,
                                        {"tile": tile})
        x = torch.randn(2, 64, 7, 5, generator=g)
        bias = torch.randn(80, generator=g)
        res = torch.randn(2, 80, 7, 5, generator=g).contiguous(memory_format=res_layout)
        y = run.fused(x, bias=bias, relu=relu, residual=res)
        ref = F.conv2d(x.double(), run.masked_weight.double(), bias.double(), padding=1)
        ref = ref + res.double()
        ref = ref.relu() if relu else ref
        assert rel_err(y, ref) < 1e-5
        out = torch.full((2, 80, 7, 5), float("nan"))  # an NCHW out is filled too
        assert run.fused(x, bias=bias, relu=relu, residual=res, out=out) is out
        assert rel_err(out, ref) < 1e-5


@needs_avx512
def test_fused_relu_keeps_nan_like_torch():
    lay = layer(64, 32, 3, 1, 1, h=7, w=5)
    run = kernels.get(NAME).prepare(lay, torch.randn(32, 64, 3, 3), 0.75)
    x = torch.randn(1, 64, 7, 5)
    x[0, :, 3, 2] = float("nan")
    plain, fused = run.fused(x, relu=False), run.fused(x, relu=True)
    assert plain.isnan().any() and torch.equal(fused.isnan(), plain.isnan())
    assert torch.equal(fused.nan_to_num(-1.0), plain.relu().nan_to_num(-1.0))


@needs_avx512
def test_layers_it_cannot_run_get_a_reason():
    k = kernels.get(NAME)
    assert "K=32" in k.supports(layer(64, 32, 1), 0.96875)
    assert "multiples of 16" in k.supports(layer(64, 24, 1), 0.9375)
    assert "divisible" in k.supports(layer(24, 32, 1), 0.9375)  # Cin % K (the pattern's)
    assert "at most 25 taps" in k.supports(layer(32, 32, 7, padding=3, h=9), 0.5)


@needs_avx512
def test_a_sparse_network_runs_it_channels_last_without_planar_handover():
    """sparsify ranks cs_cpu_nhwc first for CS: every CS layer runs it, activations pass
    between layers as channels-last tensors (no planar handover, residual additions in the
    epilogue), and the network matches the masked dense network in float64."""
    from harness import sparse_model as sm

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 3, padding=1)
            self.a = nn.Conv2d(32, 64, 1)
            self.b = nn.Conv2d(64, 64, 3, padding=1)
            self.c = nn.Conv2d(64, 32, 1)
            self.down = nn.Conv2d(32, 48, 3, stride=2, padding=1)

        def forward(self, x):
            s = torch.relu(self.stem(x))
            y = torch.relu(self.b(torch.relu(self.a(s))))
            y = torch.relu(self.c(y) + s)
            return self.down(y).mean((2, 3))

    torch.manual_seed(0)
    m = sm.sparsify(Block().eval(), "cs", 0.9375, input_size=(3, 16, 16), dense_layout="nchw")
    rep = m.sparsify_report
    assert {v["kernel"] for v in rep.replaced.values()} == {NAME}
    assert "stem" in rep.dense and rep.handover == []
    # the residual addition in c's epilogue, whatever sparsify measured faster
    fused = sm.fuse_layers(sm.sparsify(Block().eval(), "cs", 0.9375, input_size=(3, 16, 16),
                                       dense_layout="nchw", fuse=False), residual="all")
    assert fused.sparsify_report.residual_fused == ["c"]
    assert fused.sparsify_report.handover == []
    for x in (torch.randn(2, 3, 16, 16), torch.randn(3, 3, 12, 20)):
        with torch.inference_mode():
            for net in (m, fused):
                ref = sm.masked_dense(net).double()(x.double())
                assert rel_err(net(x), ref) < 1e-5
