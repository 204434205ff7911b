"""Trustworthy results: the gate checks the pattern and every element, the identity of a number
decides what is re-measured, options are validated, statuses are typed."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_harness import ROOT, SHAPES, bench, env, rows

import kernels
from harness import analysis, cases, gate
from harness.records import Config, Device, Measurement, RunStatus, Status
from harness.store import Store
from kernels import Run
from kernels.block_cpu import MAX_T, TILES_1XN
from kernels.cpu_common import default_tile
from shapes import ConvLayer


def layer(cin, cout, k, h, stride=1, padding=0, name="t"):
    return ConvLayer(net="test", name=name, index=0, cin=cin, cout=cout, kh=k, kw=k,
                     stride=stride, padding=padding, h=h, w=h)


# ---- the gate -------------------------------------------------------------------------------
def test_plugin_faults_are_incorrect_and_never_timed(tmp_path):
    r = bench(tmp_path, "--kernels", "faulty_dense_claims_cs,faulty_zero_one,faulty_drop_term,"
              "faulty_ignores_out,cs_cpu_direct", "--sparsities", "0.5", "--layers", "a")
    assert r.returncode == 0, r.stderr
    df = rows(tmp_path / "r.sqlite").set_index("kernel")
    for name, why in [("faulty_dense_claims_cs", "non-conforming"),
                      ("faulty_zero_one", "error"), ("faulty_drop_term", "error"),
                      ("faulty_ignores_out", "did not write into the out")]:
        assert df.loc[name, "status"] == "incorrect", (name, df.loc[name, "reason"])
        assert why in df.loc[name, "reason"], (name, df.loc[name, "reason"])
        assert np.isnan(df.loc[name, "median_s"])  # never timed
    assert df.loc["faulty_dense_claims_cs", "density"] == 1.0
    ok = df.loc["cs_cpu_direct"]
    assert set(ok.status) == {"ok"} and (ok.density == 0.5).all()


def test_element_wise_bound_catches_a_dropped_term_the_norm_misses():
    """A big output where one missing term moves the relative L2 error by less than the
    tolerance: only the element-wise bound sees it."""
    lay = layer(16, 64, 1, 256)
    w, x = gate.make_inputs(lay, 1, torch.float32, "cpu")
    kern = kernels.get("dense_cpu")
    prod = (w[:, :, 0, 0, None, None] * x[0, None]).abs()  # [cout, cin, h, w] term sizes
    # a term far above rounding error yet small against the whole output's norm
    o, c, i, j = np.unravel_index(int((prod - 0.1).abs().argmin()), prod.shape)

    def call(x, out=None):
        y = F.conv2d(x, w)
        y[0, o, i, j] -= w[o, c, 0, 0] * x[0, c, i, j]
        return out.copy_(y)

    found = gate.check_correct(lay, kern, Run(w, call), x, 0.0, {"layout": "nchw"}, "float32")
    assert found.rel_err < found.tolerance  # the norm alone would pass it
    assert found.reason and "off by" in found.reason and found.max_err > 1


def test_gate_passes_every_cpu_kernel_with_the_pattern_density():
    lay = layer(32, 32, 3, 9, padding=1)
    w, x = gate.make_inputs(lay, 2, torch.float32, "cpu")
    for name in ("cs_cpu_direct", "bsr_1xn_cpu", "cci_cpu", "unstructured_cpu"):
        k = kernels.get(name)
        cfg = k.full_config(lay, 0.75, {"rearrange": True} if name == "bsr_1xn_cpu" else {})
        found = gate.check_correct(lay, k, k.prepare(lay, w, 0.75, cfg), x, 0.75, cfg,
                                    "float32")
        assert found.reason is None, (name, found.reason)
        assert found.density == pytest.approx(0.25, abs=0.01) and found.max_err <= 1


def test_resident_output_is_poisoned_and_checked():
    lay = layer(32, 32, 3, 9, padding=1)
    w, x = gate.make_inputs(lay, 1, torch.float32, "cpu")
    k = kernels.get("cs_cpu_direct")
    run = k.prepare(lay, w, 0.5)

    def lazy_resident(xl, out=None):  # leaves the last output row unwritten
        y = run.resident(xl)
        out[..., :-1, :] = y[..., :-1, :]
        return out

    bad = Run(run.masked_weight, run, layout=run.layout, resident=lazy_resident)
    found = gate.check_correct(lay, k, bad, x, 0.5, k.full_config(lay, 0.5), "float32")
    assert found.reason.startswith("kernel-only path: output contains NaN")


# ---- nothing derived from the input is cached between timed calls --------------------------
def _kernels_to_check():
    return [n for n in kernels.names() if kernels.get(n).available() is None
            and not n.startswith("faulty")]


@pytest.mark.parametrize("name", _kernels_to_check())
def test_output_follows_an_input_mutated_in_place(name):
    k = kernels.get(name)
    lay = layer(32, 32, 3, 8, stride=2, padding=1)
    S = 0.0 if k.pattern == "dense" else 0.5
    w, x = gate.make_inputs(lay, 1, torch.float32, "cpu")
    run = k.prepare(lay, w, S)

    def ref(inp):
        return F.conv2d(inp.double(), run.masked_weight.double(), stride=2, padding=1)

    run(x)
    x.mul_(-0.5).add_(0.25)  # same tensor, new values
    assert torch.allclose(run(x).double(), ref(x), rtol=1e-4, atol=1e-4)
    if run.has_resident:
        xl = run.layout(x)
        run.resident(xl)
        x.mul_(2.0)
        xl.copy_(run.layout(x))  # the laid-out input changes in place too
        assert torch.allclose(run.resident(xl).double(), ref(x), rtol=1e-4, atol=1e-4)


# ---- identity: what an edit re-measures -----------------------------------------------------
def _copy_project(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", ".nox", "results", "reports", "__pycache__",
                                    "*.egg-info", ".pytest_cache", ".hypothesis", ".ruff_cache")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def _run(root, tmp, *args):
    shapes = tmp / "tiny.csv"
    shapes.write_text(SHAPES)
    e = {**env(), "PYTHONPATH": f"{root}{':'}{ROOT / 'tests'}"}
    return subprocess.run([sys.executable, "-m", "harness", "bench", "--shapes-csv", str(shapes),
                           "--db", str(tmp / "r.sqlite"), "--rounds", "3", "--min-sample",
                           "0.0002", "--no-progress", "--no-confirm", "--nets", "", "--threads",
                           "1", "--layers", "b", "--sparsities", "0.5", *args], cwd=root, env=e,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_editing_the_1xn_cpp_source_re_measures_only_the_1xn_kernel(tmp_path):
    """Each C++ kernel family is its own source file and library: an edit of the 1xN source
    rebuilds that library only and re-measures only ``bsr_1xn_cpu`` (CS, dense reused)."""
    root = _copy_project(tmp_path / "project")
    cpu = ["--kernels", "cs_cpu_direct,bsr_1xn_cpu", "--quick"]
    r = _run(root, tmp_path, *cpu)
    assert r.returncode == 0, r.stderr
    first = rows(tmp_path / "r.sqlite")
    with open(root / "kernels" / "csrc" / "bsr_1xn.cpp", "a") as f:
        f.write("\n// an edit\n")
    r = _run(root, tmp_path, *cpu)
    assert r.returncode == 0, r.stderr
    df = rows(tmp_path / "r.sqlite")
    new = df[~df.id.isin(first.id)]
    assert set(new.kernel) == {"bsr_1xn_cpu"} and (new.status == "ok").all()
    # the two dense layouts and every CS case were already measured
    n_cs = int((first.kernel == "cs_cpu_direct").sum())
    assert f"skipped (already measured) {2 + n_cs}" in r.stdout


@pytest.mark.slow
def test_editing_the_shared_cpp_header_re_measures_every_cpp_kernel_and_nothing_else(tmp_path):
    root = _copy_project(tmp_path / "project")
    cpu = ["--kernels", "cs_cpu_direct,bsr_1xn_cpu", "--quick"]
    gpu = ["--device", "cuda", "--interpret", "--kernels", "cs_triton_weight_reuse", "--quick"]
    for args in (cpu, gpu):
        r = _run(root, tmp_path, *args)
        assert r.returncode == 0, r.stderr
    first = rows(tmp_path / "r.sqlite")
    with open(root / "kernels" / "csrc" / "common.h", "a") as f:
        f.write("\n// an edit\n")
    r_cpu, r_gpu = _run(root, tmp_path, *cpu), _run(root, tmp_path, *gpu)
    assert r_cpu.returncode == 0 and r_gpu.returncode == 0, r_cpu.stderr + r_gpu.stderr
    df = rows(tmp_path / "r.sqlite")
    new = df[~df.id.isin(first.id)]
    assert set(new.kernel) == {"cs_cpu_direct", "bsr_1xn_cpu"}  # dense and Triton reused
    assert "skipped (already measured) 2" in r_cpu.stdout  # the two dense layouts
    assert "skipped (already measured) 3" in r_gpu.stdout  # cuDNN x2 and the Triton kernel
    assert (new.status == "ok").all()


PLUGIN = '''
import torch.nn.functional as F
from kernels import Kernel, Run, register


@register
class Plug(Kernel):
    name = "{name}"
    pattern = "unstructured"
    space = {{"v": (0,)}}

    def _prepare(self, layer, weight, sparsity, config):
        wm = self.make_pattern(sparsity, config).apply(weight)

        def call(x, out=None):
            y = F.conv2d(x, wm, stride=layer.stride, padding=layer.padding)
            return y if out is None else out.copy_(y)

        return Run(wm, call)
'''


def test_editing_one_plugin_re_measures_only_that_plugin(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for name in ("plug_a", "plug_b"):
        (plugins / f"{name}.py").write_text(PLUGIN.format(name=name))
    e = {**env(), "PYTHONPATH": f"{ROOT}:{plugins}", "HARNESS_PLUGINS": "plug_a,plug_b"}

    def go():
        shapes = tmp_path / "tiny.csv"
        shapes.write_text(SHAPES)
        return subprocess.run([sys.executable, "-m", "harness", "bench", "--shapes-csv",
                               str(shapes), "--db", str(tmp_path / "r.sqlite"), "--rounds", "3",
                               "--min-sample", "0.0002", "--no-progress", "--no-confirm",
                               "--nets", "", "--threads", "1", "--kernels", "plug_a,plug_b",
                               "--sparsities",
                               "0.5,0.75"], cwd=ROOT, env=e, capture_output=True, text=True,
                              timeout=600)

    assert go().returncode == 0
    first = rows(tmp_path / "r.sqlite")
    with open(plugins / "plug_a.py", "a") as f:
        f.write("# an edit\n")
    r = go()
    assert r.returncode == 0, r.stderr
    new = rows(tmp_path / "r.sqlite")
    new = new[~new.id.isin(first.id)]
    assert set(new.kernel) == {"plug_a"} and len(new) == 4 * 2  # 4 layers x 2 sparsities


def test_retry_failed_measures_again_only_what_failed(tmp_path):
    args = ["--kernels", "faulty_wrong,cs_cpu_direct", "--sparsities", "0.5", "--layers", "a"]
    assert bench(tmp_path, *args).returncode == 0
    n = len(rows(tmp_path / "r.sqlite"))
    r = bench(tmp_path, *args, "--retry-failed")
    assert r.returncode == 0, r.stderr
    df = rows(tmp_path / "r.sqlite")
    again = df.iloc[n:]
    assert set(again.kernel) == {"faulty_wrong"} and (again.status == "incorrect").all()


def test_the_source_hash_follows_file_contents(tmp_path):
    k = kernels.get("cs_cpu_direct")
    files = {f.name for f in k.source_files()}
    assert {"cs_cpu.py", "cs.cpp", "common.h", "layout.cpp", "cpu_layout.py", "cs.py",
            "base.py"} <= files
    assert not files & {"dense.py", "triton_kernels.py", "bsr_1xn.cpp", "row_sparse.cpp",
                        "probe.cpp"}
    bsr = {f.name for f in kernels.get("bsr_1xn_cpu").source_files()}
    assert {"bsr_1xn.cpp", "common.h"} <= bsr and "cs.cpp" not in bsr
    for name in ("cci_cpu", "unstructured_cpu"):
        rs = {f.name for f in kernels.get(name).source_files()}
        assert "row_sparse.cpp" in rs and not rs & {"cs.cpp", "bsr_1xn.cpp"}
    assert not {f.name for f in kernels.get("dense_cpu").source_files()} & {"common.h", "cs.cpp"}
    t = {f.name for f in kernels.get("cs_triton_weight_reuse").source_files()}
    assert "triton_kernels.py" in t and "common.h" not in t


def test_a_portable_build_is_another_machine(monkeypatch):
    from harness import env as henv

    henv.kernel_build.cache_clear()
    fp = dict(henv.fingerprint())
    native = henv.identity_hash(fp), henv.machine_hash(fp)
    monkeypatch.setenv("SPARSECONV_PORTABLE", "1")
    henv.kernel_build.cache_clear()
    fp["kernel_build"] = henv.kernel_build()
    henv.kernel_build.cache_clear()
    assert henv.identity_hash(fp) != native[0] and henv.machine_hash(fp) != native[1]
    fp2 = dict(fp, hostname="another-host-of-the-same-kind", git_commit="x", git_dirty=True)
    assert henv.identity_hash(fp2) == henv.identity_hash(fp)  # provenance is not identity


def test_the_cpu_description_is_asked_once_per_cpu(tmp_path, monkeypatch):
    """py-cpuinfo (over a second a command) answers once per CPU: a second command reads its
    answer back; another /proc/cpuinfo (another CPU, core count or flag set) asks again, and
    a clock reading that moved does not."""
    from harness import env as henv

    asked = []
    monkeypatch.setattr(henv, "_cpuinfo_uncached",
                        lambda: asked.append(1) or {"brand_raw": f"cpu {len(asked)}",
                                                    "flags": ["avx2"]})
    monkeypatch.setenv("SPARSECONV_BUILD_DIR", str(tmp_path / "cache"))
    proc = tmp_path / "cpuinfo"
    monkeypatch.setattr(henv, "PROC_CPUINFO", proc)
    proc.write_text("model name\t: A\ncpu MHz\t\t: 2400.001\nflags\t\t: avx2 fma\n")
    assert henv._cpuinfo() == {"brand_raw": "cpu 1", "flags": ["avx2"]} and len(asked) == 1
    proc.write_text("model name\t: A\ncpu MHz\t\t: 2612.734\nflags\t\t: avx2 fma\n")
    assert henv._cpuinfo() == {"brand_raw": "cpu 1", "flags": ["avx2"]} and len(asked) == 1  # read back
    proc.write_text("model name\t: A\ncpu MHz\t\t: 2400.001\nflags\t\t: avx2 fma avx512f\n")
    assert henv._cpuinfo() == {"brand_raw": "cpu 2", "flags": ["avx2"]} and len(asked) == 2
    for f in (tmp_path / "cache").glob("cpuinfo-*.json"):
        f.write_text("[]")  # not an answer (a torn file reads the same): asked again, kept again
    assert henv._cpuinfo() == {"brand_raw": "cpu 3", "flags": ["avx2"]}
    assert henv._cpuinfo() == {"brand_raw": "cpu 3", "flags": ["avx2"]} and len(asked) == 3
    monkeypatch.setattr(henv, "PROC_CPUINFO", tmp_path / "no-such-file")
    assert henv._cpuinfo() == {"brand_raw": "cpu 4", "flags": ["avx2"]}  # no /proc: asked every time
    assert henv._cpuinfo() == {"brand_raw": "cpu 5", "flags": ["avx2"]}


# ---- ratios never mix conditions -----------------------------------------------------------
def _row(device, kernel, pattern, S, median, dense=None, layout="nchw"):
    return {"fp_hash": "f", "net": "n", "layer": "L", "batch": 1, "dtype": "float32",
            "device": device, "threads": 1, "pattern": pattern, "sparsity": S,
            "kernel": kernel, "config": Config({"layout": layout}).to_json(), "status": "ok",
            "median_s": median, "kernel_median_s": median, "dense_median_s": dense,
            "dense_kernel_median_s": dense, "count": 1, "shape": "s", "flops": 1.0,
            "layer_index": 0}


def test_two_devices_in_one_database_never_share_a_speedup():
    df = pd.DataFrame([
        _row("cpu", "dense_cpu", "dense", 0.0, 10.0),
        _row("cpu", "cs_cpu_direct", "cs", 0.5, 5.0, 10.0),
        _row("cuda-interpret", "cs_triton_weight_reuse", "cs", 0.5, 1.0, 0.5),  # no baseline
    ])
    net = analysis.network_table(df)
    assert list(net.device) == ["cpu"] and net.speedup.iloc[0] == pytest.approx(2.0)
    df.loc[len(df)] = _row("cuda-interpret", "dense_cudnn", "dense", 0.0, 0.5)
    net = analysis.network_table(df).set_index("device")
    assert net.loc["cpu", "speedup"] == pytest.approx(2.0)
    assert net.loc["cuda-interpret", "speedup"] == pytest.approx(0.5)


# ---- defaults for a swept pattern parameter ------------------------------------------------
def test_a_swept_1xn_n_gets_defaults_computed_for_its_own_n():
    lay = layer(64, 64, 3, 56, padding=1)
    cs = cases.build([lay], [0.9375], ["dense_cpu", "bsr_1xn_cpu"], 1, "float32", Device.CPU, 2)
    by_n = {c.config["N"]: c.config["T"] for c in cs if c.kernel == "bsr_1xn_cpu"}
    for n, t in by_n.items():
        assert t == default_tile(lay, tuple(v for v in TILES_1XN if v <= MAX_T[n])), n
    assert by_n[4] > 1 and by_n[4] > by_n[16]


# ---- typed statuses ------------------------------------------------------------------------
def test_no_quoted_status_name_outside_the_records_module():
    names = "|".join(s.value for s in Status) + "|" + "|".join(s.value for s in RunStatus)
    pattern = re.compile(rf"""(['"])({names})\1""")
    found = []
    for folder in ("harness", "kernels"):
        for f in (ROOT / folder).rglob("*.py"):
            if f.name == "records.py":  # the enums: the one spelling of every status
                continue
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert found == []


def test_a_sweep_that_dies_is_recorded_failed(tmp_path, monkeypatch):
    from harness import cli, drivers

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(drivers, "sweep", boom)
    shapes = tmp_path / "tiny.csv"
    shapes.write_text(SHAPES)
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["bench", "--shapes-csv", str(shapes), "--nets", "", "--db",
                  str(tmp_path / "r.sqlite"), "--kernels", "cs_cpu_direct", "--no-progress"])
    assert list(Store(tmp_path / "r.sqlite").runs().status) == ["failed"]


def test_store_columns_are_the_measurement_fields(tmp_path):
    from dataclasses import fields

    store = Store(tmp_path / "s.sqlite")
    cols = [r[1] for r in store.db.execute("PRAGMA table_info(measurements)")][1:]
    assert cols == [f.name for f in fields(Measurement)]
    with pytest.raises(TypeError):
        store.add({"status": "ok"})
