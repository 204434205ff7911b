"""Property tests: for every pattern and random shapes, masks conform, density is exact where the
pattern fixes it, kept weights are the largest of their group, and decode(encode) is exact."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import patterns as P

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
S_POW2 = st.sampled_from([0.5, 0.75, 0.875, 0.9375])


def rand_w(seed, shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def prune_and_check(p, w):
    """Shared invariants: conforms, exact round trip, mask matches the encoding."""
    wm, enc = p.prune(w)
    perm = p.permutation(w) if p.permutes else None
    assert p.conforms(wm, perm=perm) if p.permutes else p.conforms(wm)
    assert torch.equal(p.decode(enc), wm)
    assert torch.equal(wm, w * p.mask(w))
    return wm, enc


@SETTINGS
@given(S=S_POW2, M=st.sampled_from(P.CPU_M), mult=st.integers(1, 2), cout=st.integers(1, 9),
       k=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_cs_cin_form_keeps_largest_of_each_group(S, M, mult, cout, k, seed):
    p = P.make("cs", S, form="cin", M=M)
    K = p.K
    w = rand_w(seed, (cout, K * M * mult, k, k))
    wm, enc = prune_and_check(p, w)
    assert (wm != 0).sum().item() == w.numel() // K  # exact density 1/K
    # groups: Cin positions g*K*M + j + M*t, t < K, at each (o, r, s)
    g = w.permute(0, 2, 3, 1).reshape(cout, k * k, mult, K, M)
    gm = wm.permute(0, 2, 3, 1).reshape(cout, k * k, mult, K, M)
    assert ((gm != 0).sum(3) == 1).all()
    assert torch.equal(gm.abs().amax(3), g.abs().amax(3))
    assert enc.idx.max() < K and enc.index_bits == int(math.log2(K))
    # the index formula n + M*Idx (per segment) addresses the kept input channel
    cin_pos = enc.positions()
    flat = wm.permute(0, 2, 3, 1).reshape(cout, k * k, -1)
    assert torch.equal(torch.gather(flat, 2, cin_pos), enc.values)


@SETTINGS
@given(S=S_POW2, cin=st.integers(1, 12), k=st.sampled_from([1, 3]), cout=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_cs_row_form_uses_whole_row_segment(S, cin, k, cout, seed):
    p = P.make("cs", S, form="row")
    K = p.K
    R = cin * k * k
    w = rand_w(seed, (cout, cin, k, k))
    if R % K:
        assert p.unsupported(w.shape) and not p.conforms(w)
        with pytest.raises(ValueError, match="divisible"):
            p.mask(w)
        return
    wm, enc = prune_and_check(p, w)
    M = R // K
    assert enc.M == M and enc.values.shape == (cout, M)
    rows = w.reshape(cout, K, M)
    assert torch.equal(wm.reshape(cout, K, M).abs().amax(1), rows.abs().amax(1))
    assert torch.equal(torch.gather(wm.reshape(cout, -1), 1, enc.positions()), enc.values)


@SETTINGS
@given(S=st.floats(0.05, 0.95), V=st.sampled_from(P.OVW_V), groups=st.integers(1, 3),
       cin=st.integers(1, 6), k=st.sampled_from([1, 3]), permute=st.booleans(),
       seed=st.integers(0, 2**16))
def test_ovw_keeps_whole_vectors_with_largest_norm(S, V, groups, cin, k, permute, seed):
    p = P.make("ovw", S, V=V, permute=permute)
    w = rand_w(seed, (V * groups, cin, k, k))
    wm, enc = prune_and_check(p, w)
    L = cin * k * k
    keep = max(1, round((1 - S) * L))
    perm = enc.perm
    g = wm.reshape(V * groups, L)[perm].reshape(groups, V, L)
    gd = w.reshape(V * groups, L)[perm].reshape(groups, V, L)
    kept_cols = (g != 0).any(1)
    assert (kept_cols.sum(1) == keep).all()  # every group keeps exactly k vectors
    assert torch.equal((g != 0).sum(1)[kept_cols], torch.full_like(g[:, 0][kept_cols], V,
                                                                   dtype=torch.long))
    norms = gd.norm(dim=1)
    for gi in range(groups):  # every kept vector's norm >= every pruned vector's norm
        kept, pruned = norms[gi][kept_cols[gi]], norms[gi][~kept_cols[gi]]
        if pruned.numel():
            assert kept.min() >= pruned.max()
    if not permute:
        assert torch.equal(perm, torch.arange(V * groups))


@SETTINGS
@given(S=st.floats(0.05, 0.97), N=st.sampled_from(P.BLOCK_N), blocks=st.integers(1, 3),
       cin=st.integers(1, 5), k=st.sampled_from([1, 3]), rearrange=st.booleans(),
       seed=st.integers(0, 2**16))
def test_1xn_blocks_are_the_largest_l1_blocks(S, N, blocks, cin, k, rearrange, seed):
    p = P.make("1xn", S, N=N, rearrange=rearrange)
    w = rand_w(seed, (N * blocks, cin, k, k))
    wm, enc = prune_and_check(p, w)
    L = cin * k * k
    nb = blocks * L
    assert enc.nnzb == max(1, round((1 - S) * nb))
    assert (wm != 0).sum().item() == enc.nnzb * N
    b = w.reshape(N * blocks, L)[enc.perm].reshape(blocks, N, L)
    bm = wm.reshape(N * blocks, L)[enc.perm].reshape(blocks, N, L)
    kept = (bm != 0).any(1)
    score = b.abs().sum(1)
    if (~kept).any():
        assert score[kept].min() >= score[~kept].max()
    if rearrange:  # rearranged channels are sorted by descending L1 norm
        l1 = w.reshape(N * blocks, -1).abs().sum(1)[enc.perm]
        assert (l1[:-1] >= l1[1:]).all()
    assert (enc.crow[1:] >= enc.crow[:-1]).all() and enc.crow[-1] == enc.nnzb


@SETTINGS
@given(G=st.sampled_from(P.CCI_G), data=st.data(), groups=st.integers(1, 3),
       cin=st.integers(1, 6), k=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_cci_keeps_s_largest_of_each_group_column(G, data, groups, cin, k, seed):
    s = data.draw(st.integers(1, G - 1))
    p = P.make("cci", 1 - s / G, G=G)
    w = rand_w(seed, (G * groups, cin, k, k))
    wm, enc = prune_and_check(p, w)
    g = w.reshape(groups, G, -1)
    gm = wm.reshape(groups, G, -1)
    assert ((gm != 0).sum(1) == s).all()
    kept_min = torch.where(gm != 0, g.abs(), torch.inf).amin(1)
    pruned_max = torch.where(gm == 0, g.abs(), -torch.inf).amax(1)
    assert (kept_min >= pruned_max).all()
    assert enc.rows.max() < G


@SETTINGS
@given(M=st.sampled_from([4, 8, 16]), data=st.data(), cout=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_nm_keeps_n_of_every_m(M, data, cout, seed):
    n = data.draw(st.integers(1, M - 1))
    p = P.make("nm", 1 - n / M, M=M)
    w = rand_w(seed, (cout, M, 3, 3))
    wm, _ = prune_and_check(p, w)
    g, gm = w.reshape(cout, -1, M), wm.reshape(cout, -1, M)
    assert ((gm != 0).sum(2) == n).all()
    kept_min = torch.where(gm != 0, g.abs(), torch.inf).amin(2)
    assert (kept_min >= torch.where(gm == 0, g.abs(), -torch.inf).amax(2)).all()


@SETTINGS
@given(S=st.floats(0.05, 0.99), shape=st.tuples(*[st.integers(1, 7)] * 4),
       seed=st.integers(0, 2**16))
def test_unstructured_keeps_global_top_k(S, shape, seed):
    p = P.make("unstructured", S)
    w = rand_w(seed, shape)
    wm, _ = prune_and_check(p, w)
    k = max(1, round((1 - S) * w.numel()))
    assert (wm != 0).sum().item() == k
    kept = w.abs()[wm != 0]
    pruned = w.abs()[wm == 0]
    if pruned.numel():
        assert kept.min() >= pruned.max()


def test_dense_random_weight_does_not_conform():
    w = rand_w(1, (32, 32, 3, 3))
    for name, kw in [("cs", {}), ("ovw", {"V": 16}), ("1xn", {}), ("cci", {}), ("nm", {})]:
        assert not P.make(name, 0.75, **kw).conforms(w)


@pytest.mark.parametrize("name,S,params,match", [
    ("cs", 0.9, {}, r"0\.9.*valid.*0\.5, 0\.75, 0\.875, 0\.9375"),
    ("cs", 0.6, {}, "not an integer"),
    ("cs", 0.75, {"M": 3}, r"M=3.*valid.*\(1, 2, 4, 8, 16\)"),
    ("cs", 0.75, {"form": "col"}, "form 'col'"),
    ("ovw", 0.5, {"V": 8}, r"V=8.*valid"),
    ("1xn", 0.5, {"N": 3}, r"N=3.*valid"),
    ("cci", 0.6, {"G": 4}, r"valid: sparsity in 0\.75, 0\.5, 0\.25"),
    ("cci", 0.5, {"G": 5}, r"G=5.*valid"),
    ("nm", 0.3, {"M": 4}, "not an integer"),
    ("cs", 0.0, {}, r"outside \(0, 1\)"),
    ("ovw", 1.0, {}, r"outside \(0, 1\)"),
    ("1xn", -0.5, {}, r"outside \(0, 1\)"),
    ("cs", "half", {}, "must be a number"),
    ("spiky", 0.5, {}, "unknown pattern 'spiky'; valid: cs"),
    ("cs", 0.5, {"V": 16}, r"no parameter\(s\) \['V'\]"),
])
def test_invalid_parameters_raise_clear_errors(name, S, params, match):
    with pytest.raises(ValueError, match=match):
        P.make(name, S, **params)


@pytest.mark.parametrize("name,params,shape,match", [
    ("cs", {"M": 16}, (8, 64, 3, 3), r"Cin=64 divisible by K\*M=16\*16=256.*valid M.*\[1, 2, 4\]"),
    ("ovw", {"V": 64}, (32, 8, 3, 3), "V=64 is larger than Cout=32"),
    ("ovw", {"V": 16}, (40, 8, 3, 3), "Cout=40 divisible by V=16"),
    ("1xn", {"N": 16}, (24, 8, 1, 1), "Cout=24 divisible by N=16"),
    ("cci", {"G": 8}, (12, 8, 1, 1), "Cout=12 divisible by G=8"),
])
def test_unsupported_shapes_give_reasons_and_raise_on_mask(name, params, shape, match):
    p = P.make(name, 0.9375 if name == "cs" else 0.75, **params)
    assert p.unsupported(shape)
    with pytest.raises(ValueError, match=match):
        p.mask(torch.randn(shape))


def test_mask_rejects_non_4d_weights():
    with pytest.raises(ValueError, match="4-D OIHW"):
        P.make("cs", 0.5).mask(torch.randn(4, 4))
