"""Fused CPU layers: bias and ReLU in the kernels' epilogue, and consecutive sparse layers handing
activations over in the kernel's own layout, each checked against F.conv2d in float64; the
fusion pass picks exactly the layer pairs that can hand over."""

import sqlite3

import pytest
import torch
import torch.nn.functional as F
from kernel_check import layer, rel_err
from torch import nn

import harness
import kernels
from harness import sparse_model as sm
from harness.store import Store
from kernels.cpu_layout import CpuLayout
from shapes.models import build

CPU_KERNELS = [("cs_cpu_direct", {"decode": "offsets"}), ("cs_cpu_direct", {"decode": "inline"}),
               ("cs_cpu_direct", {"decode": "aligned"}),  # its own layout: whole-vector rows
               ("bsr_1xn_cpu", {"rearrange": True}), ("cci_cpu", {}), ("unstructured_cpu", {})]
# (producer, consumer): odd sizes, a stride-2 producer, a 1x1 consumer read as NCHW, stride-2
# consumers (the producer scatters each row over the phase planes: 2x2 of them for 3x3 and 7x7,
# one for 1x1, whose other phases are never read)
PAIRS = [(layer(32, 64, 1, h=9, w=11), layer(64, 32, 3, padding=1, h=9, w=11)),
         (layer(32, 64, 3, stride=2, padding=1, h=17), layer(64, 64, 3, padding=1, h=9)),
         (layer(64, 64, 3, padding=1, h=7), layer(64, 32, 1, h=7)),
         (layer(32, 32, 3, padding=2, h=6), layer(32, 64, 5, padding=2, h=8)),
         (layer(32, 64, 1, h=9, w=11), layer(64, 32, 3, stride=2, padding=1, h=9, w=11)),
         (layer(32, 64, 3, padding=1, h=10, w=7), layer(64, 32, 1, stride=2, h=10, w=7)),
         (layer(32, 64, 1, h=11, w=10), layer(64, 32, 7, stride=2, padding=3, h=11, w=10)),
         (layer(32, 64, 3, stride=2, padding=1, h=17), layer(64, 64, 3, stride=2, h=9))]


def prepare(name, extra, lay, S, g):
    k = kernels.get(name)
    cfg = {**k.default_config(lay, S), **extra}
    if extra.get("decode") == "aligned" and k.supports(lay, S, cfg):
        cfg = k.default_config(lay, S)  # 5x5, or 7x7 at stride 2: more than 3 column shifts
    return k.prepare(lay, torch.randn(lay.cout, lay.cin, lay.kh, lay.kw, generator=g), S, cfg)


@pytest.mark.parametrize("name,extra", CPU_KERNELS)
@pytest.mark.parametrize("pair", range(len(PAIRS)), ids=lambda i: f"pair{i}")
def test_a_handed_over_pair_equals_conv_relu_conv(name, extra, pair):
    a, b = PAIRS[pair]
    g = torch.Generator().manual_seed(pair)
    S = 0.75
    ra, rb = prepare(name, extra, a, S, g), prepare(name, extra, b, S, g)
    bias_a, bias_b = torch.randn(a.cout, generator=g), torch.randn(b.cout, generator=g)
    dest = rb.cpu_layout  # the layout the consumer's kernel reads
    if extra.get("decode") == "aligned" and b.kw <= 3:  # 5x5 and 7x7 s2 shift more than 3 times
        assert dest.aligned and ra.cpu_layout.aligned == (a.kw <= 3)
    buf = dest.empty(2)
    for seed in (1, 2):  # a second input: nothing of the first may survive in the buffer
        x = torch.randn(2, a.cin, a.h, a.w, generator=torch.Generator().manual_seed(seed))
        mid = F.relu(F.conv2d(x.double(), ra.masked_weight.double(), bias_a.double(),
                              a.stride, a.padding))
        ref = F.conv2d(mid, rb.masked_weight.double(), bias_b.double(), b.stride, b.padding)
        # epilogue alone: NCHW out, into a NaN-poisoned tensor
        out = torch.full(mid.shape, float("nan"))
        assert ra.fused(x, bias=bias_a, relu=True, out=out) is out
        assert rel_err(out, mid) < 1e-5
        # handover: the producer writes the consumer's layout, the consumer reads it as is
        laid = ra.fused(x, bias=bias_a, relu=True, dest=None if dest.direct else dest,
                        out=None if dest.direct else buf)
        y = rb.fused(laid, laid_out=not dest.direct, bias=bias_b)
        assert rel_err(y, ref) < 1e-5
        if not dest.direct:  # the producer wrote what the layout conversion writes
            assert (buf - dest.layout(mid.float())).abs().max() < 1e-4


# a 1x1 and a stride-2 1x1 layer (accumulators stored straight from registers), a padded 3x3
# and a padded stride-2 3x3 (through the tile buffer: grid rows wider than the output), odd
# sizes: the residual is read at each output element's offset
RESIDUAL_LAYERS = [layer(32, 64, 1, h=9, w=11), layer(32, 64, 3, padding=1, h=7, w=5),
                   layer(64, 32, 1, stride=2, h=9, w=10),
                   layer(64, 32, 3, stride=2, padding=1, h=9, w=10)]


@pytest.mark.parametrize("name,extra", CPU_KERNELS)
def test_a_residual_in_the_epilogue_equals_conv_plus_shortcut_then_relu(name, extra):
    g = torch.Generator().manual_seed(7)
    for lay in RESIDUAL_LAYERS:
        run = prepare(name, extra, lay, 0.75, g)
        x = torch.randn(2, lay.cin, lay.h, lay.w, generator=g)
        bias = torch.randn(lay.cout, generator=g)
        res = torch.randn(2, lay.cout, lay.oh, lay.ow, generator=g)
        conv = F.conv2d(x.double(), run.masked_weight.double(), bias.double(), lay.stride,
                        lay.padding) + res.double()
        for relu in (True, False):
            out = torch.full(res.shape, float("nan"))
            assert run.fused(x, bias=bias, relu=relu, out=out, residual=res) is out
            assert rel_err(out, F.relu(conv) if relu else conv) < 1e-5, (lay, relu)
        with pytest.raises(ValueError, match="residual must be"):
            run.fused(x, bias=bias, residual=res[:1])


def test_a_handover_needs_matching_shapes():
    g = torch.Generator().manual_seed(0)
    a = layer(32, 64, 3, padding=1, h=9)
    ra = prepare("cs_cpu_direct", {}, a, 0.75, g)
    with pytest.raises(ValueError, match="cannot hand"):
        ra.fused(torch.randn(1, 32, 9, 9), dest=CpuLayout.of(layer(64, 64, 3, padding=1, h=8)))


def _block_ends(net, replaced):
    """The sparse layers that end a residual block (their output plus the shortcut, then ReLU):
    conv3 of a bottleneck, conv2 of a basic block; none outside ResNets."""
    last = {"resnet50": ".conv3", "resnet18": ".conv2"}.get(net)
    return {n for n in replaced if last and n.startswith("layer") and n.endswith(last)}


def _expected_pairs(net, layers, replaced):
    """Which (producer, consumer) pairs can hand over, from the architecture: in a residual
    block conv1 -> conv2, stride 1 or 2 (the block input also feeds the shortcut, so nothing
    hands over into conv1); in VGG consecutive convolutions with no pooling between;
    in SqueezeNet none (a squeeze feeds two expands)."""
    if net.startswith("resnet"):
        return {(n, n[:-1] + "2") for n in replaced
                if n.endswith(".conv1") and n[:-1] + "2" in replaced
                and layers[n[:-1] + "2"].kh > 1}
    if net == "vgg19":
        feats = build(net).features
        convs = [i for i, m in enumerate(feats) if isinstance(m, nn.Conv2d)]
        return {(f"features.{i}", f"features.{j}") for i, j in zip(convs, convs[1:])
                if j == i + 2 and f"features.{i}" in replaced and f"features.{j}" in replaced}
    return set()


@pytest.mark.parametrize("net", ["resnet50", "resnet18", "vgg19", "squeezenet1_1"])
def test_fusion_hands_over_exactly_the_pairs_the_architecture_allows(net, planar_cs):
    size = 64 if net == "squeezenet1_1" else 32
    model = build(net, seed=5)
    x = torch.rand(2, 3, size, size) * 2 - 1
    sparse = harness.sparsify(model, "cs", 0.9375, input_size=(3, size, size))
    rep = sparse.sparsify_report
    _, layers, _ = sm.dense_folded(model, (3, size, size))
    want = _expected_pairs(net, layers, set(rep.replaced))
    # a pair into a stride-2 consumer was measured both ways; it hands over where that was faster
    strided = {(a, b) for a, b in want if layers[b].stride > 1}
    assert {tuple(k.split(" -> ")) for k in rep.strided} == strided
    assert set(map(tuple, rep.strided_kept)) <= strided
    assert set(map(tuple, rep.handover)) == (want - strided) | set(map(tuple, rep.strided_kept))
    if net != "squeezenet1_1":
        assert want  # the check above is not vacuous
    if net == "resnet50":
        assert strided  # layer2-4's first blocks: conv1 -> a stride-2 conv2
    consumers = {b for _, b in rep.handover}
    for a, b in rep.handover:
        ma, mb = sparse.get_submodule(a), sparse.get_submodule(b)
        assert ma.dest is not None and ma.dest.layer.shape_str == mb.layer.shape_str
        assert mb.laid_in and ma.laid_in == (a in consumers)
    # every replaced layer whose output only feeds a ReLU has it fused
    assert rep.relu_fused and set(rep.relu_fused) <= set(rep.replaced)
    assert all(sparse.get_submodule(n).relu for n in rep.relu_fused)
    # every block end was timed with the shortcut added in its kernel and after it; those
    # measured faster fused add it there, then the block's ReLU
    ends = _block_ends(net, rep.replaced)
    assert set(rep.residual) == ends and set(rep.residual_apart) <= ends
    assert set(rep.residual_fused) == ends - set(rep.residual_apart)
    assert all(sparse.get_submodule(n).residual and n in rep.relu_fused
               for n in rep.residual_fused)
    if net.startswith("resnet"):
        assert len(ends) == (16 if net == "resnet50" else 8)
    unfused = harness.sparsify(model, "cs", 0.9375, input_size=(3, size, size), fuse=False)
    with torch.no_grad():
        want_y = sm.masked_dense(unfused).double()(x.double())
        assert rel_err(sparse(x), want_y) < 1e-4
        assert rel_err(sm.masked_dense(sparse).double()(x.double()), want_y) < 1e-12
        assert rel_err(sm.fuse_layers(unfused, handover=False)(x), want_y) < 1e-4
        every = sm.fuse_layers(unfused, handover="strided")  # every stride-2 pair hands over
        assert set(map(tuple, every.sparsify_report.handover)) == want
        assert rel_err(every(x), want_y) < 1e-4
        every = sm.fuse_layers(unfused, residual="all")  # every block end adds its shortcut
        assert set(every.sparsify_report.residual_fused) == ends
        assert rel_err(every(x), want_y) < 1e-4
        apart = sm.fuse_layers(unfused, residual=False)
        assert not apart.sparsify_report.residual_fused
        assert rel_err(apart(x), want_y) < 1e-4


class ReluThenAdd(nn.Module):
    """relu(conv(x)) + x, and an in-place x.add_(conv(x)): neither addition may move into the
    kernel (the ReLU comes before the addition; the in-place one writes the shortcut)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 32, 1)

    def forward(self, x):
        y = torch.relu(self.a(x)) + x
        return y.add_(self.b(y)).relu()


def test_a_relu_before_the_addition_or_an_in_place_addition_stays_outside_the_kernel():
    model = ReluThenAdd().eval()
    sparse = harness.sparsify(model, "cs", 0.75, input_size=(32, 8, 8))
    rep = sparse.sparsify_report
    assert rep.relu_fused == ["a"] and not rep.residual_fused
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        want = sm.masked_dense(harness.sparsify(model, "cs", 0.75, input_size=(32, 8, 8),
                                                fuse=False)).double()(x.double())
        assert rel_err(sparse(x), want) < 1e-5
        assert rel_err(sm.fuse_layers(sparse, residual="all")(x), want) < 1e-5


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(32, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        if y.sum() > 0:
            y = y * 2
        return self.b(y)


def test_an_untraceable_model_runs_unfused_and_says_why():
    torch.manual_seed(0)
    model = Branchy().eval()
    sparse = harness.sparsify(model, "cs", 0.75, input_size=(32, 8, 8))
    rep = sparse.sparsify_report
    assert rep.fusion.startswith("not fused: torch.fx cannot trace") and not rep.handover
    assert set(rep.replaced) == {"a", "b"}
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        assert rel_err(sparse(x), sm.masked_dense(sparse).double()(x.double())) < 1e-4


def test_a_database_from_before_the_new_e2e_columns_gains_them(tmp_path):
    db = tmp_path / "old.db"
    Store(db)
    con = sqlite3.connect(db)
    con.execute("ALTER TABLE e2e DROP COLUMN handover")
    con.execute("ALTER TABLE e2e DROP COLUMN sparse_unfused_s")
    con.commit()
    con.close()
    cols = {r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(e2e)")}
    assert "handover" not in cols
    Store(db)
    cols = {r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(e2e)")}
    assert {"handover", "sparse_unfused_s"} <= cols


@pytest.mark.parametrize("k,stride,padding,h,w", [(3, 1, 1, 9, 11), (3, 2, 1, 17, 15),
                                                  (3, 2, 1, 16, 16), (1, 2, 0, 13, 14),
                                                  (5, 1, 2, 6, 7), (7, 2, 3, 19, 18),
                                                  (3, 3, 0, 10, 11), (1, 1, 1, 5, 5)])
def test_the_parallel_layout_pass_equals_the_sliced_reference(k, stride, padding, h, w):
    lay = CpuLayout.of(layer(8, 8, k, stride=stride, padding=padding, h=h, w=w))
    x = torch.randn(3, 8, h, w)
    got = lay.fill(x, torch.full_like(lay.empty(3), 0.0))
    want = lay.fill_reference(x, lay.empty(3))
    assert torch.equal(got, want)
    # the padding is never written: a NaN-filled buffer keeps NaN exactly where the reference
    # leaves zeros, and the interior equals the reference
    poisoned = lay.fill(x, torch.full_like(lay.empty(3), float("nan")))
    interior = ~torch.isnan(lay.fill_reference(x, torch.full_like(lay.empty(3), float("nan"))))
    assert torch.equal(~torch.isnan(poisoned), interior)
    assert torch.equal(poisoned[interior], want[interior])


@pytest.mark.parametrize("k,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 2, 1)])
def test_the_nchw_max_pool_equals_pytorchs(k, stride, padding):
    """Exactly F.max_pool2d: odd sizes, padding as -inf (all-negative inputs), NaN propagated
    from one element of a window; the module falls back to PyTorch where the pass does not
    apply (channels_last input, ceil_mode)."""
    from kernels.cpu_layout import max_pool_nchw

    g = torch.Generator().manual_seed(k * 10 + padding)
    for n, c, h, w in [(2, 3, 9, 11), (1, 5, 8, 8), (3, 2, 13, 7)]:
        x = -torch.rand(n, c, h, w, generator=g) - 1
        x[0, 0, 1, 2] = float("nan")
        got, want = max_pool_nchw(x, k, stride, padding), F.max_pool2d(x, k, stride, padding)
        assert got.shape == want.shape
        assert torch.equal(got.isnan(), want.isnan()) and want.isnan().any()
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
    x = torch.randn(2, 4, 10, 10, generator=g)
    for pool in (nn.MaxPool2d(k, stride, padding), nn.MaxPool2d(k, stride, padding,
                                                                ceil_mode=True)):
        mod = sm.NchwMaxPool(pool)
        for t in (x, x.contiguous(memory_format=torch.channels_last)):
            assert torch.equal(mod(t), pool(t))
    with pytest.raises(ValueError, match="max_pool_nchw"):
        max_pool_nchw(x.double(), k, stride, padding)


@pytest.mark.parametrize("n,k,bias", [(4096, 2048, True), (7, 37, True), (10, 16, False),
                                      (1, 5, True)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_the_few_images_linear_pass_equals_float64(n, k, bias, m):
    """The C++ pass for a dense Linear at 1 to GEMV_MAX_ROWS images (rows not a multiple of 4,
    widths not a multiple of the vector, no bias) against float64; a NaN in one image's input
    gives NaN in every output of that image and no other, as a dot product does; GemvLinear
    runs PyTorch's Linear for a larger batch, and masked_dense turns it back into that Linear."""
    from kernels.cpu_layout import GEMV_MAX_ROWS, linear_gemv

    g = torch.Generator().manual_seed(n + k + m)
    lin = nn.Linear(k, n, bias=bias)
    x = torch.randn(m, k, generator=g)
    with torch.no_grad():
        want = F.linear(x.double(), lin.weight.double(), None if lin.bias is None
                        else lin.bias.double())
        got = linear_gemv(x, lin.weight, lin.bias)
        assert got.shape == (m, n) and rel_err(got, want) < 1e-6
        x[m - 1, k // 2] = float("nan")
        got = linear_gemv(x, lin.weight, lin.bias)
        assert got[m - 1].isnan().all() and not got[:m - 1].isnan().any()
        mod = sm.GemvLinear(lin)
        big = torch.randn(GEMV_MAX_ROWS + 1, k, generator=g)
        assert torch.equal(mod(big), lin(big))
        wrapped = nn.Sequential(mod)
        wrapped.sparsify_report = None
        assert isinstance(sm.masked_dense(wrapped)[0], nn.Linear)
    with pytest.raises(ValueError, match="linear_gemv"):
        linear_gemv(torch.randn(GEMV_MAX_ROWS + 1, k), lin.weight, lin.bias)
    with pytest.raises(ValueError, match="linear_gemv"):
        linear_gemv(torch.randn(0, k), lin.weight, lin.bias)
