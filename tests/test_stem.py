"""The stem pass (kernels/stem.py): a dense convolution with few input channels, its ReLU and
the max-pool after it in one C++ pass, against PyTorch's three operations in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import sparse_model as sm
from kernels import _ext, stem

# n, cin, h, w, cout, kernel, stride, padding, (pool kernel, stride, padding), relu
GEOMETRIES = [
    (1, 3, 64, 64, 64, 7, 2, 3, (3, 2, 1), True),  # ResNet's stem on a small image
    (3, 3, 37, 41, 32, 7, 2, 3, (3, 2, 1), True),  # odd sizes, a batch the threads do not divide
    (2, 1, 20, 17, 16, 3, 1, 1, (2, 2, 0), False),
    (1, 4, 9, 9, 80, 5, 2, 2, (3, 1, 1), True),  # 80 channels: the last block of vectors short
    (2, 8, 15, 16, 48, 1, 1, 0, (3, 2, 1), True),
]


def reference(x, w, b, stride, pad, pool, relu):
    y = F.conv2d(x.double(), w.double(), b.double(), stride, pad)
    return F.max_pool2d(y.relu() if relu else y, *pool)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: "x".join(map(str, g[:8])))
def test_the_pass_equals_convolution_relu_and_max_pool(geo, threads):
    n, cin, h, w, cout, k, s, p, pool, relu = geo
    torch.manual_seed(0)
    x, wt, b = torch.randn(n, cin, h, w), torch.randn(cout, cin, k, k), torch.randn(cout)
    was = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = stem.conv_pool(x, stem.pack_weight(wt), b, k, s, p, pool, relu)
        # a channels-last input is read as the same tensor
        y_cl = stem.conv_pool(x.contiguous(memory_format=torch.channels_last),
                              stem.pack_weight(wt), b, k, s, p, pool, relu)
    finally:
        torch.set_num_threads(was)
    want = reference(x, wt, b, s, p, pool, relu)
    assert y.shape == want.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert ((y.double() - want).abs().max() / want.abs().max()).item() < 1e-5
    assert torch.equal(y, y_cl)


def test_a_nan_in_the_input_gives_nan_where_pytorch_does():
    torch.manual_seed(1)
    x, wt, b = torch.randn(1, 3, 30, 30), torch.randn(16, 3, 7, 7), torch.randn(16)
    x[0, 1, 12, 20] = float("nan")
    y = stem.conv_pool(x, stem.pack_weight(wt), b, 7, 2, 3, (3, 2, 1), True)
    want = reference(x, wt, b, 2, 3, (3, 2, 1), True)
    assert want.isnan().any() and not want.isnan().all()
    assert torch.equal(y.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.allclose(y.double()[ok], want[ok], rtol=1e-5, atol=1e-5)


def test_an_empty_batch_and_a_too_small_input():
    wt, b = stem.pack_weight(torch.randn(16, 3, 7, 7)), torch.zeros(16)
    y = stem.conv_pool(torch.randn(0, 3, 32, 32), wt, b, 7, 2, 3, (3, 2, 1), True)
    assert y.shape == (0, 16, 8, 8)
    with pytest.raises(ValueError, match="too small"):
        stem.conv_pool(torch.randn(1, 3, 2, 2), wt, b, 7, 2, 0, (3, 2, 1), True)
    with pytest.raises(ValueError, match="3 channels"):
        stem.conv_pool(torch.randn(1, 4, 32, 32), wt, b, 7, 2, 3, (3, 2, 1), True)
    x = torch.randn(1, 3, 32, 32)
    for bad_w, bad_b in ((wt, torch.zeros(8)), (wt, torch.zeros(16, dtype=torch.float64)),
                         (wt.double(), b), (torch.randn(16, 3, 7, 7).permute(2, 1, 3, 0), b)):
        with pytest.raises(ValueError, match="packed by pack_weight"):
            stem.conv_pool(x, bad_w, bad_b, 7, 2, 3, (3, 2, 1), True)


@pytest.mark.parametrize("conv,pool,why", [
    (nn.Conv2d(3, 64, 7, 2, 3, groups=1), nn.MaxPool2d(3, 2, 1), None),
    (nn.Conv2d(4, 64, 3, groups=2), nn.MaxPool2d(2), "ungrouped"),
    (nn.Conv2d(3, 64, (7, 5)), nn.MaxPool2d(2), "not square"),
    (nn.Conv2d(16, 64, 3), nn.MaxPool2d(2), "16 input channels"),
    (nn.Conv2d(3, 20, 3), nn.MaxPool2d(2), "20 output channels"),
    (nn.Conv2d(3, 64, 3), nn.MaxPool2d(2, ceil_mode=True), "ceil_mode"),
    (nn.Conv2d(3, 64, 3), nn.AvgPool2d(2), "not a Conv2d followed by a MaxPool2d"),
])
def test_what_the_pass_does_not_take_is_said(conv, pool, why):
    said = stem.why_not(conv, pool)
    assert (said is None) if why is None else (why in said)


def test_the_module_falls_back_to_the_three_operations_where_the_pass_does_not_apply():
    """A gradient wanted, or a float64 input: the convolution, ReLU and pool as PyTorch runs
    them, the same answer."""
    torch.manual_seed(2)
    conv, pool = nn.Conv2d(3, 32, 7, 2, 3), nn.MaxPool2d(3, 2, 1)
    mod = sm.ConvPool(sm.ChannelsLastConv2d(conv), True, sm.ChannelsLastPool(pool))
    x = torch.randn(2, 3, 40, 40)
    want = pool(conv(x).relu())
    with torch.no_grad():
        fast = mod(x)
    slow = mod(x)
    assert slow.requires_grad and torch.allclose(slow, want, atol=1e-5)
    assert not fast.requires_grad and torch.allclose(fast, want, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(mod.double()(x.double()), want.double(), atol=1e-5)


def test_the_module_follows_its_weight_when_it_changes():
    """A state dict loaded into the model (the weight written in place) or a new weight
    tensor: the pass packs it again, so it answers as the three operations do."""
    torch.manual_seed(3)
    conv, pool = nn.Conv2d(3, 16, 3, 1, 1), nn.MaxPool2d(2)
    mod = sm.ConvPool(sm.ChannelsLastConv2d(conv), True, sm.ChannelsLastPool(pool))
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        first = mod(x)
        mod.load_state_dict({k: v * 2 for k, v in mod.state_dict().items()})
        assert torch.allclose(mod(x), mod.apart(x), atol=1e-5)
        assert not torch.allclose(mod(x), first)
        mod.conv.conv.weight = nn.Parameter(torch.randn(16, 3, 3, 3))
        assert torch.allclose(mod(x), mod.apart(x), atol=1e-5)


class Stem(nn.Module):
    """A stem (convolution, ReLU, max-pool) and one layer the CS pattern takes; with
    ``reuse``, the ReLU's output is also read after the pool."""

    def __init__(self, reuse=False):
        super().__init__()
        self.reuse = reuse
        self.conv1, self.relu, self.pool = nn.Conv2d(3, 16, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 16, 3, 1, 1)

    def forward(self, x):
        h = self.relu(self.conv1(x))
        y = self.conv2(self.pool(h))
        return y + h.mean() if self.reuse else y


@pytest.mark.parametrize("reuse", [False, True])
def test_only_a_chain_whose_links_have_no_other_use_runs_as_one_pass(reuse):
    torch.manual_seed(4)
    model = Stem(reuse).eval()
    sparse = sm.sparsify(model, "cs", 0.75, input_size=(3, 16, 16), dense_layout="conv_pool")
    assert sparse.sparsify_report.conv_pool == ([] if reuse else ["conv1"])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = sm.masked_dense(sparse).double()(x.double())
        assert ((sparse(x).double() - want).abs().max() / want.abs().max()).item() < 1e-5


def test_the_library_says_how_it_was_built():
    assert stem.available()
    assert stem.STEM.load().sc_vector_width() == _ext.lanes()
