"""Whole networks: drop-in sparse models equal the masked dense network, plans are checked before
use, and ``e2e`` gates, times and stores whole-network latency."""

import copy
import json
import subprocess
import sys
import time

import pytest
import torch
from test_harness import ROOT, env
from torch import nn

import harness
import kernels
import shapes
from harness import env as henv
from harness import plan as hplan
from harness import sparse_model as sm
from harness.records import SPARSE_CONV, residual_fused
from harness.store import Store
from kernels import _ext
from shapes.models import build

# PyTorch eager only, nothing timed alone, short samples: the engines have their own tests
QUIET = ["--engines", "none", "--no-alone", "--min-sample", "0.002"]
SIZES = {"resnet50": 32, "resnet18": 32, "vgg19": 32, "squeezenet1_1": 64}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def conforms(mod, sparsity):
    k = kernels.get(mod.kernel)
    pat = k.make_pattern(sparsity, mod.config)
    w = mod.masked_weight.double()
    ok = pat.conforms(w, mod.run.perm) if pat.permutes else pat.conforms(w)
    want = int(pat.mask(torch.ones_like(w)).sum())
    return ok and int((w != 0).sum()) == want


@pytest.mark.parametrize("net", shapes.NETS)
@pytest.mark.parametrize("pattern,S", [("cs", 0.9375), ("1xn", 0.75)])
def test_sparsify_equals_the_masked_dense_network(net, pattern, S):
    size = SIZES[net]
    model = build(net, seed=3)  # random BN statistics and affine parameters
    x = torch.rand(2, 3, size, size) * 2 - 1
    folded, layers, bns = sm.dense_folded(model, (3, size, size))
    with torch.no_grad():
        assert rel(folded(x), model(x)) < 1e-5  # folding alone changes nothing
    sparse = harness.sparsify(model, pattern, S, input_size=(3, size, size))
    rep = sparse.sparsify_report
    assert set(rep.replaced) | set(rep.dense) == set(layers)
    assert len(rep.folded) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    if pattern == "cs":  # the cin-form CS kernels need Cin divisible by K*M (K=16): M=1 and
        # Cout a multiple of 16 for the channels-last one (AVX-512), else M>=2
        nhwc = _ext.avx512()
        assert set(rep.dense) == {n for n, lay in layers.items() if lay.cin % 32 and not (
            nhwc and lay.cin % 16 == 0 and lay.cout % 16 == 0)}
        stem = next(iter(layers))
        assert "Cin=3" in rep.dense[stem]
    else:  # 1xN needs Cout divisible by N (every default N is a multiple of 4)
        assert set(rep.dense) == {n for n, lay in layers.items() if lay.cout % 4}
    for name in rep.replaced:
        mod = sparse.get_submodule(name)
        assert isinstance(mod, sm.SparseConv2d) and conforms(mod, S), name
    # each Linear left dense runs where measured faster at the batch: PyTorch's or the C++ pass
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(rep.dense_linear) == linears
    for n in linears:
        said = rep.dense_linear[n]
        assert "C++ pass" in said and "PyTorch" in said and " ms" in said
        assert isinstance(sparse.get_submodule(n), sm.GemvLinear) == said.startswith("C++")
    with torch.no_grad():
        want = sm.masked_dense(sparse).double()(x.double())
        assert rel(sparse(x), want) < 1e-4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sparse.modules())


def test_aligned_row_layers_hand_over_and_add_residuals_inside_a_network(monkeypatch,
                                                                         planar_cs):
    """ResNet18 at 56x56: layer1's 3x3 layers run at 14x14, where the aligned rows are the CS
    default (16-float grid rows); they hand over to each other in that layout and take their
    block's residual, and the network equals the masked dense one."""
    from kernels import cs_cpu

    if not _ext.avx512():  # elsewhere the plain layout is the default: take the aligned one
        monkeypatch.setattr(cs_cpu, "_aligned_pays", lambda lay: lay.kw == 3 and lay.h == 14)
    model = build("resnet18", seed=4)
    x = torch.rand(2, 3, 56, 56) * 2 - 1
    sparse = harness.sparsify(model, "cs", 0.9375, input_size=(3, 56, 56))
    rep = sparse.sparsify_report
    aligned = {n for n in rep.replaced if sparse.get_submodule(n).in_layout.aligned}
    assert {"layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv2"} <= aligned
    assert ("layer1.0.conv1", "layer1.0.conv2") in rep.handover
    assert "layer1.0.conv2" in set(rep.residual)  # measured both ways, fused or not
    with torch.no_grad():
        want = sm.masked_dense(sparse).double()(x.double())
        assert rel(sparse(x), want) < 1e-4
        # batch 1: the fc layer runs where it was measured faster (the C++ pass or PyTorch)
        assert rel(sparse(x[:1]), want[:1]) < 1e-4
        for n in aligned:
            assert conforms(sparse.get_submodule(n), 0.9375), n


def test_the_dense_operations_run_in_the_layout_measured_faster(monkeypatch):
    """The stem convolution and the max-pool stay dense: asked for a layout, they run in it
    (with "conv_pool", the convolution, its ReLU and the pool as one pass); by default both
    layouts are timed and the faster kept, NCHW once the channels_last max-pool and the one
    pass are made 20 ms slower; in channels_last the stem is timed as one pass against its
    three operations and runs as one pass once both max-pools are 20 ms slower. Every choice
    equals the masked dense network, whose reference holds PyTorch operations only, and a
    replay of the decisions builds the same network."""
    model = build("resnet18", seed=5)
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def kinds(m):
        return {type(mod).__name__ for mod in m.modules()}

    def in_graph(m):  # the modules the fused network calls
        return {type(m.get_submodule(n.target)).__name__ for n in m.graph.nodes
                if n.op == "call_module"}

    want = None
    for how, cl in (("channels_last", True), ("nchw", False), ("conv_pool", True)):
        sparse = harness.sparsify(model, "cs", 0.9375, input_size=(3, 32, 32), dense_layout=how)
        assert ("ChannelsLastPool" in kinds(sparse)) is cl
        assert ("NchwMaxPool" in kinds(sparse)) is not cl
        assert ("ChannelsLastConv2d" in kinds(sparse)) is cl
        called = in_graph(sparse)
        assert ("ConvPool" in called) is (how == "conv_pool"), called
        assert ("ChannelsLastPool" in called) is (how == "channels_last"), called
        assert sparse.sparsify_report.conv_pool == (["conv1"] if how == "conv_pool" else [])
        assert not {"NchwMaxPool", "ConvPool"} & kinds(sm.masked_dense(sparse))  # torch only
        assert sparse.sparsify_report.dense_layout == f"{how} (as asked)"
        with torch.no_grad():
            want = sm.masked_dense(sparse).double()(x.double()) if want is None else want
            assert rel(sparse(x), want) < 1e-4
            assert rel(sm.masked_dense(sparse)(x), want) < 1e-4

    def slowed(cls):
        fast = cls.forward

        def slower(self, t):
            time.sleep(0.02)
            return fast(self, t)
        monkeypatch.setattr(cls, "forward", slower)

    slowed(sm.ChannelsLastPool)
    slowed(sm.ConvPool)
    sparse = harness.sparsify(model, "cs", 0.9375, input_size=(3, 32, 32))
    said = sparse.sparsify_report.dense_layout
    assert said.startswith("nchw (2 dense operation(s); measured whole network at 1x3x32x32")
    assert "in one pass" in said, said  # the one pass was timed too
    assert "ChannelsLastPool" not in kinds(sparse), said
    with torch.no_grad():
        assert rel(sparse(x), want) < 1e-4
    monkeypatch.undo()
    slowed(sm.ChannelsLastPool)
    slowed(sm.NchwMaxPool)
    sparse = harness.sparsify(model, "cs", 0.9375, input_size=(3, 32, 32))
    rep = sparse.sparsify_report
    assert rep.dense_layout.startswith("channels_last (2 dense operation(s)"), rep.dense_layout
    assert rep.decisions()["dense_layout"] == "channels_last"
    assert rep.conv_pool_kept == ["conv1"] == rep.decisions()["conv_pool"]
    assert rep.conv_pool_timed["conv1"].startswith("one pass: "), rep.conv_pool_timed
    assert "conv1: one pass" in rep.dense_ops()
    assert "ConvPool" in in_graph(sparse) and "1 dense convolution(s) with their max-pool" \
        in rep.fusion
    again = harness.sparsify(model, "cs", 0.9375, input_size=(3, 32, 32),
                             decisions=sparse.sparsify_report.decisions())  # an alone process
    assert "ConvPool" in in_graph(again) and again.sparsify_report.conv_pool == ["conv1"]
    with torch.no_grad():
        assert rel(sparse(x), want) < 1e-4
    with pytest.raises(sm.SparsifyError, match="dense_layout must be one of"):
        harness.sparsify(model, "cs", 0.9375, input_size=(3, 32, 32), dense_layout="nhwc")


@pytest.mark.parametrize("pattern", ["cs", "cs planar", "1xn"])
def test_a_sparsified_model_takes_any_input_size_and_batch_as_the_dense_one_does(pattern,
                                                                                request):
    """Prepared at 32x32, the fused ResNet18 runs at other sizes and batches (each sparse layer
    prepares its kernel for a new size on first use, from its masked weight) and equals the
    masked dense network at every one, the first size again included. CS runs channels-last
    where AVX-512 builds (nothing to hand over), and on the planar kernel ("cs planar")."""
    if pattern == "cs planar":
        request.getfixturevalue("planar_cs")
    planar = pattern != "cs" or not _ext.avx512()
    model = build("resnet18", seed=6)
    sparse = harness.sparsify(model, pattern.split()[0], 0.9375, input_size=(3, 32, 32))
    assert bool(sparse.sparsify_report.handover) == planar  # handed over at its own size
    ref = sm.masked_dense(sparse).double()
    for n, h, w in [(1, 32, 32), (2, 40, 56), (3, 17, 19), (2, 32, 32)]:
        x = torch.rand(n, 3, h, w) * 2 - 1
        with torch.no_grad():
            y = sparse(x)
            assert rel(y, ref(x.double())) < 1e-4, (n, h, w)
        assert y.shape == (n, 1000)
    convs = [m for m in sparse.modules() if isinstance(m, sm.SparseConv2d)]
    for m in convs:  # the same kernel at the other sizes: the masks reproduce exactly
        assert all(how.startswith(m.kernel) for _, how in m._sizes.values()), m._sizes
    # two new sizes for most layers (the last stage can meet its own 1x1 or 2x2 again)
    assert sum(len(m._sizes) for m in convs) > 1.5 * len(convs)


def test_a_layer_keeps_a_bounded_set_of_sizes_and_falls_back_to_its_masked_weight(monkeypatch):
    """A size whose kernel would not reproduce the layer's mask runs as a dense convolution over
    ``masked_weight`` (still the same function); only the last ``SIZES_KEPT`` sizes stay
    prepared."""
    torch.manual_seed(0)
    model = UserNet().eval()
    sparse = harness.sparsify(model, "cs", 0.75, input_size=(16, 12, 12))
    ref = sm.masked_dense(sparse).double()
    a = sparse.get_submodule("a")
    k = kernels.get(a.kernel)
    real = k.prepare

    def other_mask(layer, weight, sparsity, config=None):  # layer a: a mask of its own at 9x9
        run = real(layer, weight, sparsity, config)
        if (layer.name, layer.h) == ("a", 9):
            run.masked_weight = run.masked_weight.roll(1, dims=1)
        return run

    monkeypatch.setattr(k, "prepare", other_mask)
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        assert rel(sparse(x), ref(x.double())) < 1e-4
    assert a.prepared_at(9, 9).startswith("dense over masked_weight")
    assert "mask at this size differs" in a.prepared_at(9, 9)
    assert sparse.get_submodule("b").prepared_at(9, 9).startswith(sparse.get_submodule("b")
                                                                  .kernel)
    for h in range(13, 13 + sm.SIZES_KEPT + 2):
        with torch.no_grad():
            sparse(torch.randn(1, 16, h, h))
    assert len(a._sizes) == sm.SIZES_KEPT and (9, 9) not in a._sizes


def test_a_plan_used_at_another_input_size_says_so(tmp_path):
    model = UserNet().eval()
    base = harness.sparsify(model, "cs", 0.75, input_size=(16, 12, 12))
    layers = [m.layer for m in base.modules() if isinstance(m, sm.SparseConv2d)]
    plan = hplan.Plan(
        net="user", pattern="cs", sparsity=0.75, device="cpu", batch=1, dtype="float32",
        threads=torch.get_num_threads(), strategy="model", fingerprint={}, identity="x",
        machine_hash="m", network_speedup=1.0, default_network_speedup=1.0, evaluations=0,
        layers=tuple(hplan.PlanLayer(
            layer=lay.name, index=lay.index, count=1, shape=lay.shape_str,
            kernel=base.get_submodule(lay.name).kernel,
            source_hash=kernels.get(base.get_submodule(lay.name).kernel).source_hash(),
            config=base.get_submodule(lay.name).config, time_s=1.0, dense_s=1.0, speedup=1.0)
            for lay in layers))
    sparse = harness.sparsify(model, "cs", 0.75, plan=plan, input_size=(16, 12, 12), net="user",
                              identity="x")
    with pytest.warns(UserWarning, match="at a 12x12 input runs at another input size"):
        with torch.no_grad():
            sparse(torch.randn(1, 16, 20, 20))


# VGG19's three Linear layers (100M weights, 30-40 s a pattern) run with the slow tests; ResNet18's
# one classifier covers the same path in the default run
@pytest.mark.parametrize("net", [pytest.param("vgg19", marks=pytest.mark.slow), "resnet18"])
@pytest.mark.parametrize("pattern", ["cs", "1xn"])
def test_the_classifier_is_sparsified_on_request(net, pattern):
    model = build(net, seed=4)
    with torch.no_grad():  # uniform float32 init holds exact zeros among 100M weights, which
        for m in model.modules():  # would make the non-zero count below miss a kept weight
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn_like(m.weight) * 0.01)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    plain = harness.sparsify(model, pattern, 0.9375, input_size=(3, 32, 32))
    assert plain.sparsify_report.classifier.startswith("kept dense")
    assert not any(isinstance(m, sm.SparseLinear) for m in plain.modules())
    sparse = harness.sparsify(model, pattern, 0.9375, input_size=(3, 32, 32), linear=True)
    rep = sparse.sparsify_report
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert rep.classifier.startswith(f"sparsified: {len(linears)} Linear layer(s)")
    for name in linears:
        mod = sparse.get_submodule(name)
        assert isinstance(mod, sm.SparseLinear) and name in rep.replaced
        assert mod.masked_weight.shape == (*model.get_submodule(name).weight.shape, 1, 1)
        assert conforms(mod, 0.9375), name  # 1 - S of the weights, in the pattern
    with torch.no_grad():
        want = sm.masked_dense(sparse).double()(x.double())
        assert rel(sparse(x), want) < 1e-4
        # the reference really uses the masked classifier: the dense one differs
        assert rel(sm.masked_dense(plain).double()(x.double()), want) > 1e-3


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(32)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.b = nn.Conv2d(32, 64, 1)
        self.bn_b = nn.BatchNorm2d(64)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.relu(self.grouped(x))
        return self.bn_b(self.b(x)) + 1.0


def test_a_user_model_with_a_grouped_conv():
    torch.manual_seed(0)
    model = UserNet().eval()
    with torch.no_grad():
        for bn in (model.bn_a, model.bn_b):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    sparse = harness.sparsify(model, "cs", 0.75, input_size=(16, 12, 12))
    rep = sparse.sparsify_report
    assert set(rep.replaced) == {"a", "b"} and list(rep.dense) == ["grouped"]
    assert "grouped" in rep.dense["grouped"]
    assert sorted(rep.folded) == ["bn_a", "bn_b"]
    x = torch.randn(3, 16, 12, 12)
    with torch.no_grad():
        assert rel(sparse(x), sm.masked_dense(sparse).double()(x.double())) < 1e-4
    for name in ("a", "b"):
        assert conforms(sparse.get_submodule(name), 0.75)


def make_plan(net, pattern, S, layers, batch=1, identity=None, size=32):
    """A plan in the autotuner's format for ``layers``: [(ConvLayer, kernel, config)]."""
    entries = [{"layer": lay.name, "index": lay.index, "count": lay.count,
                "shape": lay.shape_str, "kernel": k, "config": cfg,
                "source_hash": kernels.get(k).source_hash(), "time_s": 1e-3, "dense_s": 2e-3,
                "speedup": 2.0} for lay, k, cfg in layers]
    return {"schema": hplan.SCHEMA, "net": net, "pattern": pattern, "sparsity": S,
            "device": "cpu", "batch": batch, "dtype": "float32", "threads": 2,
            "strategy": "test", "fingerprint": {}, "network_speedup": 2.0,
            "identity": identity or henv.identity_hash(henv.fingerprint()),
            "machine_hash": henv.machine_hash(henv.fingerprint()),
            "layers": entries}


def _layers(net, size):
    return shapes.unique(shapes.from_model(build(net), (3, size, size), net=net))


def test_a_foreign_plan_is_refused_with_one_reason():
    lay = _layers("resnet18", 32)[1]
    good = make_plan("resnet18", "cs", 0.9375, [(lay, "cs_cpu_direct", {"M": 2})])
    model = build("resnet18")
    kw = dict(input_size=(3, 32, 32), net="resnet18", batch=1,
              identity=henv.identity_hash(henv.fingerprint()))
    sparse = harness.sparsify(model, "cs", 0.9375, plan=good, **kw)
    used = [sparse.get_submodule(n) for n, r in sparse.sparsify_report.replaced.items()]
    assert any(m.layer.shape_str == lay.shape_str and m.config["M"] == 2 for m in used)
    for change, message in [({"net": "resnet50"}, "made for net 'resnet50'"),
                            ({"sparsity": 0.875}, "made for sparsity 0.875"),
                            ({"pattern": "1xn"}, "made for pattern '1xn'"),
                            ({"batch": 8}, "made for batch 8"),
                            ({"identity": "0123456789abcdef"}, "another machine")]:
        with pytest.raises(sm.SparsifyError, match=message):
            harness.sparsify(model, "cs", 0.9375, plan={**good, **change}, **kw)
    stale = json.loads(json.dumps(good))
    stale["layers"][0]["source_hash"] = "0" * 16
    with pytest.raises(sm.SparsifyError, match="source of cs_cpu_direct changed"):
        harness.sparsify(model, "cs", 0.9375, plan=stale, **kw)


def e2e(tmp_path, *args, plugins=""):
    return subprocess.run([sys.executable, "-m", "harness", "e2e", "--db",
                           str(tmp_path / "e.sqlite"), "--size", "32", "--rounds", "3",
                           "--threads", "1", "--plans", str(tmp_path / "plans"), *QUIET, *args],
                          cwd=ROOT, env=env(HARNESS_PLUGINS=plugins), capture_output=True,
                          text=True, timeout=900)


def test_e2e_measures_and_stores_a_network(tmp_path):
    r = e2e(tmp_path, "--nets", "resnet18", "--patterns", "cs,1xn")
    assert r.returncode == 0, r.stderr
    assert "no plan at" in r.stdout and "measured" in r.stdout
    df = Store(tmp_path / "e.sqlite").e2e().set_index("pattern")
    assert set(df.status) == {"ok"} and (df.rel_err < 1e-4).all()
    for p in ("cs", "1xn"):
        row = df.loc[p]
        assert row.speedup == pytest.approx(row.dense_s / row.sparse_s)
        assert row.dense_s == min(row.dense_nchw_s, row.dense_cl_s)
        assert row.estimate == pytest.approx(row.conv_dense_s / row.conv_sparse_s)
        assert row.replaced >= 19
        # the fused network and its two variants on the same kernels were all timed
        assert row.sparse_epilogue_s > 0 and row.sparse_unfused_s > 0
        pairs = json.loads(row.handover)  # each pair with the time it saves, measured
        if p == "cs" and _ext.avx512():  # channels-last layers: nothing to hand over
            assert pairs == []
            continue
        assert ["layer1.0.conv1", "layer1.0.conv2"] in [p[:2] for p in pairs]
        assert len(pairs) == 8 and all(isinstance(p[2], float) for p in pairs)
    assert "8 layer pair(s) hand over in the kernel's layout, saving" in r.stdout
    again = e2e(tmp_path, "--nets", "resnet18", "--patterns", "cs")
    assert "already measured" in again.stdout  # same identity: not measured twice


def test_a_kernel_wrong_in_one_layer_makes_the_network_incorrect_and_untimed(tmp_path):
    import faulty_kernels  # noqa: F401 - registers faulty_wrong in this process

    lay = _layers("resnet18", 32)[3]
    p = make_plan("resnet18", "unstructured", 0.5, [(lay, "faulty_wrong", {"variant": 0})])
    (tmp_path / "plans").mkdir()
    hplan.save(p, tmp_path / "plans" / "resnet18_unstructured_0.5_cpu.json")
    r = e2e(tmp_path, "--nets", "resnet18", "--patterns", "unstructured", "--sparsities", "0.5",
            plugins="faulty_kernels")
    assert r.returncode == 0, r.stderr
    assert "plan " in r.stdout and "refused" not in r.stdout
    (row,) = Store(tmp_path / "e.sqlite").e2e().itertuples()
    assert row.status == "incorrect" and "relative error" in row.reason
    assert row.sparse_s is None or row.sparse_s != row.sparse_s  # never timed


SLOW_RELU = '''
import time
import torch.nn as nn

_forward = nn.ReLU.forward


def slow(self, x):
    time.sleep(0.004)
    return _forward(self, x)


nn.ReLU.forward = slow
'''


def test_a_slow_non_conv_module_raises_the_latency_not_the_summed_estimate(tmp_path):
    (tmp_path / "slow_relu.py").write_text(SLOW_RELU)
    runs = {}
    for name, plugins in (("plain", ""), ("slow", "slow_relu")):
        db = tmp_path / f"{name}.sqlite"
        r = subprocess.run([sys.executable, "-m", "harness", "e2e", "--db", str(db), "--size",
                            "32", "--rounds", "3", "--threads", "1", "--nets", "resnet18",
                            "--plans", str(tmp_path), *QUIET], cwd=ROOT,
                           env={**env(HARNESS_PLUGINS=plugins),
                                "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}:{tmp_path}"},
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr
        (runs[name],) = Store(db).e2e().itertuples()
    plain, slow = runs["plain"], runs["slow"]
    # the stem and two per BasicBlock: the one after each block's first conv runs inside
    # the sparse kernel in the fused network (but not in its unfused variant), and the one
    # after a block's addition where sparsify measured the addition faster in the kernel
    assert 8 <= slow.relu_fused <= 16 and 8 <= plain.relu_fused <= 16
    ends = len(residual_fused(slow.residual))
    assert slow.relu_fused == 8 + ends
    relu_calls = 17 - slow.relu_fused
    added = slow.sparse_s - plain.sparse_s
    assert added > 0.8 * relu_calls * 0.004  # the measured latency sees every slow call
    assert slow.sparse_unfused_s - plain.sparse_unfused_s > 0.8 * 17 * 0.004
    assert abs(slow.conv_sparse_s - plain.conv_sparse_s) < 0.25 * added  # the estimate does not
    assert slow.outside_share > plain.outside_share
    # timed node by node inside the network, the slow ReLUs are where the time went
    where = {k: json.loads(r.in_network) for k, r in runs.items()}
    assert where["slow"]["ReLU"] - where["plain"]["ReLU"] > 0.8 * relu_calls * 0.004
    assert where["slow"]["ReLU"] < 1.5 * relu_calls * 0.004 + where["plain"]["ReLU"]
    assert abs(where["slow"][SPARSE_CONV] - where["plain"][SPARSE_CONV]) < 0.25 * added
    assert slow.outside_in_network > plain.outside_in_network
    assert slow.outside_in_network == pytest.approx(
        1 - where["slow"][SPARSE_CONV] / sum(where["slow"].values()))


def test_e2e_bad_input_exits_2(tmp_path, cli):
    for args, message in [(["--nets", "alexnet"], "unknown net"),
                          (["--patterns", "zz"], "unknown pattern"),
                          (["--size", "8"], "--size: must be >= 32"),
                          (["--device", "cuda"], "--interpret")]:
        code, _, err = cli("e2e", "--db", tmp_path / "e.sqlite", "--threads", "1", "--plans",
                           tmp_path / "plans", *args)
        assert code == 2 and message in err, err
        assert len(err.strip().splitlines()) == 1


def test_table_plan_re_measures_every_layer_of_a_plan_in_one_run(tmp_path, cli):
    lays = shapes.unique(shapes.load("resnet18"))
    picked = [lay for lay in lays if lay.name in ("layer3.0.conv2", "layer4.0.conv2")]
    p = make_plan("resnet18", "cs", 0.9375, [(picked[0], "cs_cpu_direct", {"M": 4}),
                                             (picked[1], "dense_cpu", {"layout": "nchw"})])
    hplan.save(p, tmp_path / "p.json")
    db = tmp_path / "t.sqlite"

    def table(*args):
        return subprocess.run([sys.executable, "-m", "harness", "table", "--db", str(db),
                               "--rounds", "2", "--min-sample", "0", "--no-progress", *args],
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)

    r = table("--plan", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    rows = Store(db).measurements(latest=False)
    assert set(rows.run_id) == {1}  # one new run: 2 dense layouts x 2 layers + the sparse case
    assert len(rows) == 5 and set(rows.status) == {"ok"}
    sparse = rows[rows.kernel == "cs_cpu_direct"].iloc[0]
    assert sparse.layer == "layer3.0.conv2" and json.loads(sparse.config)["M"] == 4
    lines = r.stdout.splitlines()
    assert any(line.strip().startswith("layer3.0.conv2") and "cs_cpu_direct" in line
               for line in lines)
    assert any("layer4.0.conv2" in line and "dense (plan)" in line for line in lines)
    assert "geometric mean over 2 unique non-stem layers" in r.stdout
    assert "summed network-level" in r.stdout
    again = table("--plan", str(tmp_path / "p.json"))  # measured again, never reused
    assert again.returncode == 0 and set(Store(db).measurements(latest=False).run_id) == {1, 2}
    stale = json.loads(json.dumps(p))
    stale["layers"][0]["source_hash"] = "0" * 16
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    code, _, err = cli("table", "--db", db, "--plan", tmp_path / "stale.json")
    assert code == 2 and err.startswith("error:") and \
        "source of cs_cpu_direct changed" in err and "Traceback" not in err


def test_e2e_accounts_for_the_stem_run_as_one_pass(monkeypatch):
    """A network whose stem runs with its ReLU and max-pool as one pass (ConvPool): the summed
    convolutions time its convolution on its real input, the in-network breakdown names the
    pass, and what the pass saves is timed against the three operations on that input: planted
    5 ms slower apart, it saves at least 4 ms."""
    from harness import e2e
    from harness.records import Device, TimingOptions

    model = build("resnet18", seed=5)
    sparse = harness.sparsify(model, "cs", 0.9375, input_size=(3, 32, 32),
                              dense_layout="conv_pool")
    dense, _, _ = sm.dense_folded(model, (3, 32, 32))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert sparse.sparsify_report.conv_pool == ["conv1"]
    ins = e2e._conv_inputs(sparse, x)
    assert ins["conv1"].shape == (1, 3, 32, 32) and "conv1.conv" not in ins
    opts = TimingOptions(rounds=3, min_sample=1e-3, warmup=0.0, max_contention=None)
    one_pass = sm.ConvPool.forward

    # the sum times the convolution, not the pass around it: a pass planted 0.5 s slower
    # would put at least that in the sum (all of ResNet18's convolutions at 32x32 sum to a
    # few ms; one run with two test workers on two cores summed 25 ms)
    def slow_pass(self, t):
        time.sleep(0.5)
        return one_pass(self, t)

    monkeypatch.setattr(sm.ConvPool, "forward", slow_pass)
    with torch.inference_mode():
        conv_d, conv_s = e2e._conv_sums(dense, sparse, x, Device.CPU, opts)
    assert 0 < conv_s < 0.5 and conv_d > 0
    monkeypatch.undo()
    where, _ = e2e.in_network(sparse, x, runs=2)
    assert "Conv2d+ReLU+MaxPool2d (one pass)" in where and "MaxPool2d" not in where
    apart = sm.ConvPool.apart

    def slower(self, t):
        time.sleep(0.005)
        return apart(self, t)

    monkeypatch.setattr(sm.ConvPool, "apart", slower)
    with torch.inference_mode():  # as e2e times (a gradient wanted runs the three operations)
        [(name, saved)] = e2e._conv_pool_savings(sparse, x, Device.CPU, opts)
    assert name == "conv1" and saved > 0.004


def test_in_network_tells_what_the_sparse_layers_wait_for_memory(monkeypatch):
    """``in_network`` times each sparse layer where it runs, then once more at once: a layer
    slow only when another node ran before it (its data pushed out of the caches, simulated
    here by a sleep) shows the difference in the first figure and not in the second."""
    from harness.e2e import in_network

    # long against what two test workers sharing two cores cost a tiny layer's threads (a run
    # with 10 ms read 16 ms in the repeats, which must show none of it)
    COLD = 0.05
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()).eval()
    net = sm.sparsify(model, "cs", 0.75, input_size=(16, 12, 12), dense_layout="nchw")
    layers = [m for m in net.modules() if isinstance(m, sm.SparseConv2d)]
    assert len(layers) == 2
    last = []
    for m in layers:
        conv = m._conv

        def cold_first(*a, m=m, conv=conv, **kw):
            if not last or last[-1] is not m:  # another node ran since: "cold"
                time.sleep(COLD)
            last.append(m)
            return conv(*a, **kw)
        monkeypatch.setattr(m, "_conv", cold_first)
    x = torch.randn(1, 16, 12, 12)
    with torch.inference_mode():
        before = net(x)
    where, (first, repeated) = in_network(net, x, runs=3)
    assert where[SPARSE_CONV] > 2 * COLD and first > 2 * COLD  # both ran cold once per run
    assert repeated < first - 0.8 * 2 * COLD  # their repeats did not wait
    with torch.inference_mode():  # the repeated calls left the network's answer as it was
        assert torch.equal(net(x), before)


def test_sparsify_replays_its_measured_decisions_without_measuring(monkeypatch):
    """``Report.decisions()`` and ``sparsify(decisions=)``: a process timing the network alone
    builds the network the run measured. Planted decisions, the opposite of what was measured
    where there was a choice, are followed exactly, nothing is timed, and the answer is the
    same network's."""
    from harness import timing

    torch.manual_seed(0)
    model = build("resnet50")
    first = sm.sparsify(model, "1xn", 0.9375, input_size=(3, 32, 32))
    rep = first.sparsify_report
    measured = rep.decisions()
    assert measured["dense_layout"] in ("nchw", "channels_last")
    pairs = [k.split(" -> ") for k in rep.strided]
    ends = sorted(rep.residual)
    assert pairs and ends and "fc" in rep.dense_linear
    planted = {"dense_layout": "nchw" if measured["dense_layout"] == "channels_last"
               else "channels_last",
               "gemv": [] if measured["gemv"] else ["fc"],
               "strided": [] if measured["strided"] else pairs[:1],
               "residual_apart": [] if measured["residual_apart"] else ends[:1],
               "conv_pool": [],  # 1xN takes the stem: no dense convolution
               "batch_chunk": 0}  # batch 1: one image per call whatever is asked

    def no_timing(*a, **kw):
        raise AssertionError("a replayed sparsify timed something")
    monkeypatch.setattr(timing, "interleaved_cpu", no_timing)
    again = sm.sparsify(model, "1xn", 0.9375, input_size=(3, 32, 32), decisions=planted)
    got = again.sparsify_report
    assert got.decisions() == planted
    assert "as decided before" in got.dense_linear["fc"]
    # and the network built follows them: its handover pairs, fused block ends, Linear, layout
    handed = {tuple(p) for p in got.handover}
    assert all((tuple(p) in handed) == (p in planted["strided"]) for p in pairs)
    assert all((e in got.residual_fused) == (e not in planted["residual_apart"]) for e in ends)
    assert isinstance(again.get_submodule("fc"), sm.GemvLinear) == bool(planted["gemv"])
    pools = [type(m) for m in again.modules()
             if isinstance(m, (sm.ChannelsLastPool, sm.NchwMaxPool))]
    assert pools and all(p is (sm.NchwMaxPool if planted["dense_layout"] == "nchw"
                               else sm.ChannelsLastPool) for p in pools)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert rel(again(x), first(x)) < 1e-5


def test_a_batch_runs_in_the_number_of_images_per_call_measured_fastest(monkeypatch):
    """At batch 4 ``sparsify`` times the fused network whole and 1 and 2 images per call and
    keeps the fastest: with a max-pool planted to cost 10 ms on one image, nothing on two and
    30 ms on four, two per call is the fastest (4 x 10 ms one by one, 30 ms whole). The network
    then calls its layers on two images at a time, equals the masked dense network image for
    image, and a replay of its decisions builds the same; the layer choices after it were
    timed at two images."""
    from harness import timing

    cost = {1: 0.01, 2: 0.0, 4: 0.03}

    def slowed(forward):
        def slow(self, t):
            time.sleep(cost.get(t.shape[0], 0.0))
            return forward(self, t)
        return slow

    for pool in (sm.ChannelsLastPool, sm.NchwMaxPool):
        monkeypatch.setattr(pool, "forward", slowed(pool.forward))
    sizes = []
    interleaved = timing.interleaved_cpu

    def spy(variants, *a, **kw):
        sizes.extend(arg.shape[0] for _, arg in variants.values())
        return interleaved(variants, *a, **kw)

    monkeypatch.setattr(timing, "interleaved_cpu", spy)
    model = build("resnet18", seed=3)
    sparse = harness.sparsify(model, "1xn", 0.9375, input_size=(3, 32, 32), batch=4)
    rep = sparse.sparsify_report
    assert isinstance(sparse, sm.BatchChunks) and sparse.batch_chunk == 2, rep.batch_chunks
    assert rep.batch_chunk == 2 and rep.decisions()["batch_chunk"] == 2
    assert rep.batch_chunks.startswith("2 images per call (measured whole network at 4x3x32x32")
    for said in ("whole batch", "1 image per call", "2 images per call"):
        assert said + " " in rep.batch_chunks.split(": ", 1)[1], rep.batch_chunks
    assert rep.residual  # measured, on two images (not on the batch of 4)
    assert 4 in sizes and 2 in sizes and sizes[-1] == 2
    seen = []
    first = next(m for m in sparse.modules() if isinstance(m, sm.SparseConv2d))
    hook = first.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    ref = sm.masked_dense(sparse).double()
    with torch.no_grad():
        y = sparse(x)
        assert y.shape == (4, 1000) and rel(y, ref(x.double())) < 1e-4
        assert seen == [2, 2]
        seen.clear()
        assert rel(sparse(x[:1]), ref(x[:1].double())) < 1e-4 and seen == [1]
    hook.remove()
    again = harness.sparsify(model, "1xn", 0.9375, input_size=(3, 32, 32), batch=4,
                             decisions=rep.decisions())
    assert again.batch_chunk == 2 and "as decided before" in again.sparsify_report.batch_chunks
    copied = copy.deepcopy(again)
    assert copied.batch_chunk == 2
    with torch.no_grad():
        assert torch.equal(copied(x), again(x))
    cost.update({1: 0.0, 2: 0.03})  # now one image per call is fastest
    one = harness.sparsify(model, "1xn", 0.9375, input_size=(3, 32, 32), batch=4)
    assert one.batch_chunk == 1, one.sparsify_report.batch_chunks


BROKEN_1XN = '''
from harness import sparse_model

_choose = sparse_model._choose_dense_layout


def broken(m, *a, **kw):  # (plugins load at the first kernel lookup, inside sparsify)
    if m.sparsify_report.pattern == "1xn":
        raise TypeError("planted")
    return _choose(m, *a, **kw)


sparse_model._choose_dense_layout = broken
'''


@pytest.mark.parametrize("pattern", ["cs", "cs planar", "1xn"])
def test_threads_calling_one_sparse_model_at_once_get_their_own_answers(pattern, request):
    """The prepared layers keep their input-layout and handover buffers per calling thread:
    shared, two threads running one fused ResNet50 on different images at once wrote into each
    other's buffers (ResNet50 at 224x224 came out wrong by 1e-3 relative in most calls)."""
    from concurrent.futures import ThreadPoolExecutor

    if pattern == "cs planar":  # the planar kernel's per-thread layout buffers
        request.getfixturevalue("planar_cs")
    torch.manual_seed(0)
    sparse = harness.sparsify(build("resnet50"), pattern.split()[0], 0.9375,
                              input_size=(3, 64, 64), dense_layout="nchw")
    assert bool(sparse.sparsify_report.handover) == (pattern != "cs" or not _ext.avx512())
    xs = [torch.rand(1, 3, 64, 64) * 2 - 1 for _ in range(8)]

    def run(x):
        with torch.inference_mode():
            return sparse(x)

    alone = [run(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            together = list(pool.map(run, xs))
            assert all(torch.equal(a, b) for a, b in zip(alone, together))


class _MixesImages(nn.Module):
    def forward(self, x):
        return x - x.mean(0, keepdim=True)  # each image's answer depends on the others


class _Pair(nn.Module):
    def forward(self, x):
        return x, x.sum()


@pytest.mark.parametrize("tail, said", [
    (_MixesImages(), "gives another answer than the whole batch"),
    (_Pair(), "its output is not one tensor with the batch first"),
])
def test_a_model_whose_batch_cannot_be_split_runs_it_whole(tail, said):
    """Chunks are kept only where the model's output is one batch-first tensor that chunks
    reproduce: a model mixing images across the batch, or answering a tuple, runs its batch
    whole, with the reason in the report."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), tail)
    sparse = harness.sparsify(model, "1xn", 0.9375, input_size=(3, 16, 16), batch=4)
    rep = sparse.sparsify_report
    assert rep.replaced and sparse.batch_chunk == 0 and rep.batch_chunk == 0
    assert rep.batch_chunks.startswith("whole batch (not run in chunks: ")
    assert said in rep.batch_chunks, rep.batch_chunks


ONE_PER_CALL = '''
import os

from harness import sparse_model

_choose = sparse_model._choose_batch_chunk


def one(m, size, decided=None):  # as if one image per call had been measured fastest
    with open(os.environ["CHUNK_LOG"], "a") as f:  # what each process was asked
        f.write(f"{os.getpid()} {decided}\\n")
    return _choose(m, size, 1 if decided is None else decided)


sparse_model._choose_batch_chunk = one
'''


def test_e2e_times_a_batch_run_a_few_images_per_call_against_the_whole_batch(tmp_path):
    """At batch 2, with one image per call chosen (planted), the e2e row checks that network
    against float64, times it beside the same network taking the whole batch in one call
    (the step's saving, its own column) and stores the choice; the process timing the project
    alone rebuilds that network from the run's decisions."""
    (tmp_path / "one_per_call.py").write_text(ONE_PER_CALL)
    db = tmp_path / "e.sqlite"
    r = subprocess.run([sys.executable, "-m", "harness", "e2e", "--db", str(db), "--size", "32",
                        "--rounds", "3", "--threads", "1", "--nets", "resnet18", "--patterns",
                        "1xn", "--batch", "2", "--plans", str(tmp_path), "--engines", "none",
                        "--min-sample", "0.002"], cwd=ROOT,
                       env={**env(HARNESS_PLUGINS="one_per_call"),
                            "CHUNK_LOG": str(tmp_path / "chunks.log"),
                            "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}:{tmp_path}"},
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    row = Store(db).e2e().iloc[0]
    assert row.status == "ok" and row.batch == 2 and row.rel_err < 1e-4
    assert row.batch_chunk.startswith("1 image per call")
    assert row.sparse_whole_s > 0 and row.sparse_s > 0 and row.sparse_epilogue_s > 0
    assert "batch: 1 image per call" in r.stdout and "the whole batch in one call" in r.stdout
    alone = {e["variant"]: e for e in json.loads(row.engines)}["project@sparse"]
    assert alone["alone_s"] > 0, alone  # the child built and ran the same network...
    asked = [line.split() for line in (tmp_path / "chunks.log").read_text().splitlines()]
    assert [d for _, d in asked] == ["None", "1"], asked  # ...from the run's decisions
    assert asked[0][0] != asked[1][0]
    where = json.loads(row.in_network)
    assert where[SPARSE_CONV] > 0


def test_a_network_that_fails_is_a_row_of_the_table_not_a_traceback(tmp_path):
    """One case failing inside sparsify is recorded with its reason; the run goes on and its
    summary prints (it read the failed row's missing columns as JSON and ended in a
    traceback)."""
    (tmp_path / "broken_1xn.py").write_text(BROKEN_1XN)
    db = tmp_path / "e.sqlite"
    r = subprocess.run([sys.executable, "-m", "harness", "e2e", "--db", str(db), "--size", "32",
                        "--rounds", "3", "--threads", "1", "--nets", "resnet18", "--patterns",
                        "1xn,cs", "--plans", str(tmp_path), *QUIET], cwd=ROOT,
                       env={**env(HARNESS_PLUGINS="broken_1xn"),
                            "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}:{tmp_path}"},
                       capture_output=True, text=True, timeout=900)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert "runtime_error: sparsify: TypeError: planted" in r.stdout
    rows = {row.pattern: row for row in Store(db).e2e().itertuples()}
    assert rows["1xn"].status == "runtime_error" and rows["cs"].status == "ok"
