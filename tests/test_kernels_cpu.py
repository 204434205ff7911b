"""Every CPU kernel against F.conv2d in float64 on run.masked_weight (see kernel_check)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from kernel_check import check, grid, layer

import kernels
import shapes
from kernels import patterns as P

CPU_SPARSE = ["cs_cpu_direct", "bsr_1xn_cpu", "cci_cpu", "unstructured_cpu"]
GEOMETRIES = [  # (cin, cout, k, stride, padding, h, w)
    (64, 32, 1, 1, 0, 13, 17),
    (64, 32, 1, 2, 0, 13, 17),
    (64, 32, 3, 1, 1, 13, 17),
    (128, 64, 3, 2, 1, 15, 15),
    (32, 16, 7, 2, 3, 21, 19),
    (64, 32, 3, 1, 0, 9, 11),
    (32, 64, 3, 2, 0, 10, 12),
]


def geom_id(g):
    return "{}->{} {}x{} s{} p{} {}x{}".format(g[0], g[1], g[2], g[2], *g[3:])


def test_cpu_kernels_are_registered_with_pattern_device_and_space():
    assert set(CPU_SPARSE + ["dense_cpu"]) <= set(kernels.names(device="cpu"))
    cs = kernels.get("cs_cpu_direct")
    assert (cs.pattern, cs.device) == ("cs", "cpu") and cs.space["M"] == (2, 4, 8, 16)
    assert kernels.get("bsr_1xn_cpu").space["N"] == (4, 8, 16, 32)
    with pytest.raises(ValueError, match="unknown kernel 'nope'"):
        kernels.get("nope")


@pytest.mark.parametrize(*grid(geom=GEOMETRIES, batch=[1, 3], S=[0.5, 0.75, 0.875, 0.9375],
                              M=P.CPU_M))
def test_cs_cpu_direct_matches_reference(geom, batch, S, M):
    lay = layer(*geom[:5], h=geom[5], w=geom[6])
    k = kernels.get("cs_cpu_direct")
    why = k.supports(lay, S, {"M": M})
    if why:
        assert "divisible" in why  # Cin too small for K*M: a reason, not garbage
        return
    err, run = check("cs_cpu_direct", lay, S, {"M": M}, batch=batch)
    assert err < 1e-5
    assert P.make("cs", S, form="cin", M=M).conforms(run.masked_weight)


@pytest.mark.parametrize("geom", [(64, 32, 3, 1, 1, 14, 14), (64, 48, 3, 2, 1, 30, 30),
                                  (128, 32, 3, 1, 1, 28, 26)], ids=geom_id)
def test_aligned_rows_are_the_default_where_they_pay_and_match_reference(geom):
    """A 3x3 layer whose padded rows round up to whole vectors with little waste runs the
    aligned-row kernel by default where the kernels build with AVX-512 (where it was measured
    faster): every grid row, plane and channel starts on a 16-float boundary, and the output
    matches float64 at every M, batch 1 and 3."""
    from kernels import _ext
    from kernels.cpu_layout import CpuLayout

    lay = layer(*geom[:5], h=geom[5], w=geom[6])
    k = kernels.get("cs_cpu_direct")
    cfg = k.default_config(lay, 0.9375)
    assert cfg["decode"] == ("aligned" if _ext.avx512() else "offsets")
    cfg = {"decode": "aligned", "T": cfg["T"] if _ext.avx512() else 8}
    al = CpuLayout.of(lay, aligned=True)
    assert al.Wq % 16 == 0 and al.chan_stride % 16 == 0 and al.Hq * al.Wq % 16 == 0
    assert (al.tap_offsets(column_shift=False) % 16 == 0).all()
    ran = 0
    for M, batch in [(2, 3), (4, 1), (8, 3)]:
        if k.supports(lay, 0.9375, {**cfg, "M": M}):
            continue
        err, run = check("cs_cpu_direct", lay, 0.9375, {**cfg, "M": M}, batch=batch)
        assert err < 1e-5 and run.info["layout"].endswith("aligned")
        assert P.make("cs", 0.9375, form="cin", M=M).conforms(run.masked_weight)
        ran += 1
    assert ran >= 2
    # rows of 5 vectors (72x72 on AVX-512: 74 columns round up to 80) no tile of the tuning
    # space spans whole: the plain layout stays the default, and the default is supported
    wide = layer(64, 32, 3, 1, 1, h=8, w=72 if _ext.avx512() else 36)
    assert k.default_config(wide, 0.9375)["decode"] == "offsets"
    assert k.supports(wide, 0.9375, k.default_config(wide, 0.9375)) is None
    # a 7x7 image would waste 7 of 16 columns a row: the plain layout stays the default
    assert k.default_config(layer(64, 32, 3, 1, 1, h=7), 0.9375)["decode"] == "offsets"


@pytest.mark.parametrize(*grid(geom=GEOMETRIES, cfg=[
    {"T": 2, "split": "channels", "cin_chunk": 0, "ob": 8, "decode": "inline"},
    {"T": 4, "split": "pixels", "cin_chunk": 64, "ob": 128, "decode": "offsets"},
    {"T": 8, "split": "pixels", "cin_chunk": 0, "ob": 128, "decode": "inline"},
    {"T": 6, "split": "channels", "cin_chunk": 64, "ob": 8, "decode": "inline"},
    {"T": 2, "split": "pixels", "cin_chunk": 64, "ob": 8, "decode": "offsets"},
    {"T": 4, "split": "pixels", "cin_chunk": 0, "ob": 8, "decode": "aligned"},
    {"T": 8, "split": "channels", "cin_chunk": 32, "ob": 32, "decode": "aligned"}]))
def test_cs_cpu_direct_configs_match_reference(geom, cfg):
    lay = layer(*geom[:5], h=geom[5], w=geom[6])
    k = kernels.get("cs_cpu_direct")
    cfg = {**cfg, "M": 2}
    if cfg["decode"] == "aligned" and lay.kw == 7:  # 7 columns at stride 2: 4 shifts
        assert "at most 3 column shifts" in k.supports(lay, 0.9375, cfg)
        return
    if lay.cin <= cfg["cin_chunk"]:  # a chunk must be smaller than Cin
        assert "smaller than Cin" in k.supports(lay, 0.9375, cfg)
        cfg["cin_chunk"] = 0
    err, _ = check("cs_cpu_direct", lay, 0.9375, cfg, batch=2)
    assert err < 1e-5


@pytest.mark.parametrize(*grid(geom=GEOMETRIES, S=[0.5, 0.75, 0.9375], N=P.BLOCK_N,
                              rearrange=[False, True]))
def test_bsr_1xn_cpu_matches_reference(geom, S, N, rearrange):
    lay = layer(*geom[:5], h=geom[5], w=geom[6])
    k = kernels.get("bsr_1xn_cpu")
    for cfg in k.configs(lay, S, fixed={"N": N, "rearrange": rearrange, "split": "pixels"}):
        err, run = check("bsr_1xn_cpu", lay, S, cfg, batch=3)
        assert err < 1e-5, cfg
    if lay.cout % N:
        assert "divisible by N" in k.supports(lay, S, {"N": N})


@pytest.mark.parametrize(*grid(geom=GEOMETRIES, GS=[(2, 0.5), (4, 0.75), (4, 0.5), (8, 0.875),
                                                    (16, 0.9375), (8, 0.625)]))
def test_cci_cpu_matches_reference(geom, GS):
    G, S = GS
    lay = layer(*geom[:5], h=geom[5], w=geom[6])
    for split in ("pixels", "channels"):
        err, run = check("cci_cpu", lay, S, {"G": G, "split": split, "T": 3}, batch=3)
        assert err < 1e-5
        assert P.make("cci", S, G=G).conforms(run.masked_weight)


@pytest.mark.parametrize(*grid(geom=GEOMETRIES, S=[0.5, 0.9]))
def test_unstructured_cpu_matches_reference(geom, S):
    lay = layer(*geom[:5], h=geom[5], w=geom[6])
    err, _ = check("unstructured_cpu", lay, S, {"T": 4}, batch=1)
    assert err < 1e-5


@pytest.mark.parametrize(*grid(geom=GEOMETRIES, layout=["nchw", "channels_last"]))
def test_dense_cpu_matches_reference_in_both_layouts(geom, layout):
    lay = layer(*geom[:5], h=geom[5], w=geom[6])
    err, run = check("dense_cpu", lay, 0.5, {"layout": layout})
    assert err < 1e-5


def _net_shapes():
    """Every unique ResNet50 and VGG19 layer with every CPU kernel (at a reduced spatial size,
    which keeps every kernel/stride/padding combination); each kernel meets every fourth layer
    in `nox -s tests`, and CI runs the whole product."""
    lays = []
    for net in ("resnet50", "vgg19"):
        for lay in shapes.unique(shapes.load(net)):
            lays.append((net, lay.scaled(min(lay.h, 11), min(lay.w, 13))))
    out = []
    for i, (net, lay) in enumerate(lays):
        for j, kernel in enumerate(CPU_SPARSE):
            marks = () if i % len(CPU_SPARSE) == j else (pytest.mark.slow,)
            out.append(pytest.param(lay, kernel, marks=marks, id=f"{net}:{lay.name}-{kernel}"))
    return out


@pytest.mark.parametrize("lay,kernel", _net_shapes())
def test_every_resnet50_and_vgg19_shape(lay, kernel):
    k = kernels.get(kernel)
    checked = 0
    for S in (0.5, 0.9375) if kernel != "cci_cpu" else (0.5, 0.75):
        why = k.supports(lay, S)
        if why:
            assert lay.cin == 3 or lay.cout % 16, why  # only the RGB stem is unsupported
            continue
        err, _ = check(kernel, lay, S, batch=1)
        assert err < 1e-5
        checked += 1
    assert checked or lay.cin == 3


def test_unsupported_combinations_give_reasons():
    stem = shapes.load("resnet50")[0]
    cs = kernels.get("cs_cpu_direct")
    assert "Cin=3 divisible" in cs.supports(stem, 0.9375)
    assert "dtypes" in cs.supports(stem.scaled(16, 16), 0.5, dtype="float16")
    assert "T must be <=" in kernels.get("bsr_1xn_cpu").supports(layer(64, 64, 3, 1, 1),
                                                                  0.5, {"N": 32, "T": 2})
    assert "not in its space" in cs.supports(layer(64, 64, 1), 0.5, {"M": 3})
    assert "no parameter" in cs.supports(layer(64, 64, 1), 0.5, {"V": 3})
    assert "power of two" in cs.supports(layer(64, 64, 1), 0.9)
    grouped = shapes.ConvLayer(net="t", name="g", index=0, cin=64, cout=64, kh=3, kw=3,
                               stride=1, padding=1, h=8, w=8, groups=2)
    assert "grouped" in cs.supports(grouped, 0.5)
    with pytest.raises(ValueError, match="Cin=3"):
        cs.prepare(stem, torch.randn(64, 3, 7, 7), 0.9375)


def test_prepare_rejects_wrong_weight_and_input_shapes():
    lay = layer(64, 32, 3, 1, 1)
    k = kernels.get("cs_cpu_direct")
    with pytest.raises(ValueError, match="does not match"):
        k.prepare(lay, torch.randn(32, 64, 1, 1), 0.5)
    run = k.prepare(lay, torch.randn(32, 64, 3, 3), 0.5)
    with pytest.raises(ValueError, match=r"expected \[N, 64, 9, 9\]"):
        run(torch.randn(1, 32, 9, 9))


def test_kernel_writes_every_output_element():
    lay = layer(64, 48, 3, 2, 1, h=13, w=17)
    run = kernels.get("cs_cpu_direct").prepare(lay, torch.randn(48, 64, 3, 3), 0.75)
    out = torch.full((2, 48, lay.oh, lay.ow), float("nan"))
    run(torch.randn(2, 64, 13, 17), out=out)
    assert not out.isnan().any()


@pytest.mark.parametrize("name,cfg", [("cs_cpu_direct", {"decode": "offsets", "T": 4}),
                                      ("cs_cpu_direct", {"decode": "inline", "T": 2}),
                                      # two Cin chunks: the first goes to the tile buffer, the
                                      # last adds it back and stores to the output
                                      ("cs_cpu_direct", {"T": 4, "cin_chunk": 64}),
                                      # 35 pixels a channel: channels padded to 64 floats
                                      ("cs_cpu_direct", {"T": 2, "cin_chunk": 64,
                                                         "decode": "aligned"}),
                                      ("bsr_1xn_cpu", {"N": 8, "T": 3}), ("cci_cpu", {"T": 3}),
                                      ("unstructured_cpu", {"T": 1})])
@pytest.mark.parametrize("relu", [False, True])
def test_register_epilogue_writes_partial_tiles_and_nothing_past_the_output(name, cfg, relu):
    """1x1 layers store from the accumulators straight into the output: 35 pixels end in a
    partial tile, and the masked store must leave the memory after the last channel alone."""
    lay = layer(128, 32, 1, h=7, w=5)
    g = torch.Generator().manual_seed(3)
    k = kernels.get(name)
    run = k.prepare(lay, torch.randn(32, 128, 1, 1, generator=g), 0.75,
                    {**k.default_config(lay, 0.75), **cfg})
    x = torch.randn(2, 128, 7, 5, generator=g)
    bias = torch.randn(32, generator=g)
    store = torch.full((2 * 32 * 35 + 64,), 12345.0)
    out = store[: 2 * 32 * 35].view(2, 32, 7, 5)
    run.fused(x, bias=bias, relu=relu, out=out)
    ref = F.conv2d(x.double(), run.masked_weight.double(), bias.double())
    ref = ref.relu() if relu else ref
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
    assert (store[2 * 32 * 35:] == 12345.0).all()


@pytest.mark.parametrize("geom,cfg", [((64, 32, 1, 1, 0, 7, 5), {}), ((64, 32, 3, 1, 1, 7, 5), {}),
                                      ((64, 32, 3, 1, 1, 7, 5), {"decode": "aligned", "T": 2})],
                         ids=["1x1 stored from registers", "3x3 through the tile buffer",
                              "3x3 aligned rows, lane shifts"])
def test_fused_relu_keeps_nan_like_torch(geom, cfg):
    """A NaN in the input stays NaN through the fused ReLU on both output paths (F.relu keeps
    NaN; a max(x, 0) with the operands the wrong way round turns it into 0)."""
    lay = layer(*geom[:5], h=geom[5], w=geom[6])
    run = kernels.get("cs_cpu_direct").prepare(lay, torch.randn(32, 64, lay.kh, lay.kw), 0.75,
                                               cfg)
    x = torch.randn(1, 64, lay.h, lay.w)
    x[0, :, 3, 2] = float("nan")
    plain = run.fused(x, relu=False)
    fused = run.fused(x, relu=True)
    assert plain.isnan().any()
    assert torch.equal(fused.isnan(), plain.isnan())
    assert torch.equal(fused.nan_to_num(-1.0), plain.relu().nan_to_num(-1.0))


def test_thread_count_does_not_change_results():
    lay = layer(64, 32, 3, 1, 1, h=15)
    run = kernels.get("cs_cpu_direct").prepare(lay, torch.randn(32, 64, 3, 3), 0.875)
    x = torch.randn(1, 64, 15, 15)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = run(x)
        torch.set_num_threads(2)
        b = run(x)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a, b)


PORTABLE_SCRIPT = """
import sys; sys.path.insert(0, 'tests')
from kernel_check import check, grid, layer
from kernels import _ext
assert _ext.isa().startswith('portable'), _ext.isa()
worst = 0.0
for name, S, cfg in [('cs_cpu_direct', 0.9375, {'M': 2, 'T': 6}), ('cs_cpu_direct', 0.5, {'T': 8}),
                     ('cs_cpu_direct', 0.75, {'M': 2, 'T': 2, 'decode': 'inline'}),
                     ('bsr_1xn_cpu', 0.75, {'N': 8, 'T': 2}), ('cci_cpu', 0.75, {'G': 4})]:
    for g in [(64, 32, 3, 2, 1, 13, 17), (64, 32, 1, 1, 0, 9, 7), (32, 16, 7, 2, 3, 21, 19)]:
        err, _ = check(name, layer(*g[:5], h=g[5], w=g[6]), S, cfg)
        worst = max(worst, err)
# the aligned rows' lane shifts on 8-lane vectors: 3 shifts, 2 at stride 2, padded 1x1 channels
for g in [(64, 32, 3, 1, 1, 13, 17), (64, 32, 3, 2, 1, 13, 17), (64, 32, 1, 1, 0, 9, 7)]:
    err, _ = check('cs_cpu_direct', layer(*g[:5], h=g[5], w=g[6]), 0.9375,
                   {'M': 2, 'T': 4, 'decode': 'aligned', 'cin_chunk': 32})
    worst = max(worst, err)
print('ISA', _ext.isa(), 'worst', worst)
assert worst < 1e-5
"""


@pytest.mark.slow
def test_portable_build_without_avx512_is_correct():
    env = {**os.environ, "SPARSECONV_PORTABLE": "1"}
    r = subprocess.run([sys.executable, "-c", PORTABLE_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=900, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ISA portable" in r.stdout


BUILD_SCRIPT = """
import sys
from kernels import _ext
_ext.LAYOUT.load()
print(_ext.build_dir() / f"sparseconv_layout_{_ext.LAYOUT.tag()}")
"""


@pytest.mark.slow
def test_a_build_killed_midway_blocks_no_one_and_every_checkout_shares_one_build(tmp_path):
    """A ``lock`` file left by a build that was killed (cpp_extension's own lock) does not make
    the next process wait; a second checkout of the same source (a copied project, a Ray node's
    copy) loads the library built by the first instead of rebuilding it."""
    import shutil

    from kernels import _ext
    root = os.path.dirname(os.path.dirname(__file__))
    env = {**os.environ, "SPARSECONV_BUILD_DIR": str(tmp_path / "cache")}
    folder = tmp_path / "cache" / f"sparseconv_layout_{_ext.LAYOUT.tag()}"
    folder.mkdir(parents=True)
    (folder / "lock").touch()  # what a build killed by SIGKILL leaves behind
    r = subprocess.run([sys.executable, "-c", BUILD_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=600, cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    (lib,) = folder.glob("*.so")
    built = lib.stat().st_mtime_ns
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(
        ".git", "results", "reports", ".nox", "__pycache__", "*.egg-info"))
    r = subprocess.run([sys.executable, "-c", BUILD_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=600, cwd=copy)
    assert r.returncode == 0, r.stdout + r.stderr
    assert lib.stat().st_mtime_ns == built  # loaded, not rebuilt
    assert not (folder / "lock").exists()


# ---- the named C++ interface ------------------------------------------------------------------
def test_geometry_dataclass_names_the_cpp_struct_fields_in_order():
    """cpu_layout.Geometry is the C++ sc_geometry (csrc/common.h) by name and order: a field
    added on one side only would shift every later field."""
    import re
    from dataclasses import fields

    from kernels import _ext
    text = (_ext.CSRC / "common.h").read_text()
    body = re.search(r"struct sc_geometry \{(.*?)\};", text, re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    cpp = [n.strip() for decl in body.split(";") if decl.strip()
           for n in decl.replace("int64_t", "").split(",")]
    assert cpp == [f.name for f in fields(_ext.Geometry)]
    assert _ext.LAYOUT.load().sc_geometry_size() == 8 * len(cpp)


def _cs_entry_and_buffers(T):
    from kernels.cpu_layout import CpuLayout
    from kernels.cs_cpu import cs_offsets
    lay = layer(32, 16, 3, 1, 1, h=9)
    lo = CpuLayout.of(lay)
    K, M, taps = 2, 2, 9
    n_vals = 16 * taps * 32 // K
    entry = cs_offsets(torch.zeros(n_vals), torch.zeros(n_vals, dtype=torch.int32), K, M, taps,
                       16, 32)
    return entry, lo.layout(torch.randn(1, 32, 9, 9)), lo.geometry(1, 16, T, 8, 0, "pixels", 1)


def test_a_refusal_in_cpp_is_a_runtime_error_with_its_reason():
    entry, xl, geo = _cs_entry_and_buffers(T=5)  # T=5 is not compiled
    with pytest.raises(RuntimeError, match="pixel tile T must be one of 1, 2, 3, 4, 6, 8; got 5"):
        entry(xl, geo, torch.empty(1, 16, 9, 9), None)


def test_a_buffer_smaller_than_its_geometry_is_refused_before_cpp_runs():
    entry, xl, geo = _cs_entry_and_buffers(T=4)
    y = torch.full((1, 16, 9, 9), 7.0)
    entry(xl, geo, y, None)  # the right size runs (zero weights: zero output)
    assert torch.equal(y, torch.zeros_like(y))
    with pytest.raises(ValueError, match="output buffer of 1200 floats is smaller"):
        entry(xl, geo, torch.empty(1200), None)
    with pytest.raises(ValueError, match="input buffer of"):
        entry(xl[:, :100].contiguous(), geo, y, None)


@pytest.mark.parametrize("name,cfg", [("cs_cpu_direct", {"decode": "offsets"}),
                                      ("cs_cpu_direct", {"decode": "inline"}),
                                      ("bsr_1xn_cpu", {}), ("cci_cpu", {}),
                                      ("unstructured_cpu", {})])
def test_a_prepared_kernel_keeps_its_encoding_alive(name, cfg):
    """The C++ entry points take raw pointers: the encoded weights must live as long as the
    prepared run, whatever the garbage collector and the allocator do meanwhile."""
    import gc
    lay = layer(32, 16, 3, 1, 1, h=9)
    S = 0.75
    run = kernels.get(name).prepare(lay, torch.randn(16, 32, 3, 3), S,
                                    kernels.get(name).full_config(lay, S, cfg))
    gc.collect()
    junk = [torch.full((4096,), float("nan")) for _ in range(256)]  # reuse freed blocks
    x = torch.randn(2, 32, 9, 9)
    ref = F.conv2d(x.double(), run.masked_weight.double(), padding=1)
    assert torch.allclose(run(x).double(), ref, rtol=1e-5, atol=1e-5)
    del junk
