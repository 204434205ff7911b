"""The GPU lease command: its plumbing (deadline, skips, the output folder's limits, rows from
every step), the lease path without optuna or Ray, the stand-in compile, the GPU row columns,
and the interpreter dry run CI runs so a lease never meets its first bug on the GPU."""

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from harness import gpu
from harness.lease import outputs

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra):
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT)
    e.update(extra)
    return e


# ---- plumbing ---------------------------------------------------------------------------
@pytest.fixture
def fake_steps(monkeypatch, tmp_path):
    """Lease steps that write one row each and take no time; step 5 fails, step 4 is slow."""
    from harness.lease import steps

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))

    def make(n, seconds=0.0, fail=False):
        def body(lease, step, until):
            time.sleep(seconds)
            if fail:
                raise RuntimeError("a broken step")
            lease.rows(step, [{"kind": "fake", "name": f"row of step {n}", "status": "ok",
                               "value": float(n)}])
            return "ok", f"step {n} body"
        return body

    for n, name in enumerate(("versions", "tests", "compile_all", "layers", "tune",
                              "network"), start=1):
        monkeypatch.setattr(steps, name, make(n, seconds=1.0 if n == 4 else 0.0,
                                               fail=n == 5))
    return steps


def _lease(tmp_path, deadline, log):
    from harness.lease import Lease
    from harness.records import Device

    return Lease(tmp_path / "out", deadline, Device.CUDA_INTERPRET, 1, workers=1, log=log)


def test_a_lease_runs_its_steps_in_order_and_writes_every_file_after_each(tmp_path,
                                                                          fake_steps):
    said = []
    lease = _lease(tmp_path, 60, lambda text, flush=True: said.append(text))
    rc = lease.run()
    assert rc == 1  # step 5 failed; the others still ran and were written
    text = "\n".join(said)
    assert text.index("plan (time budget") < text.index("== step 1")
    assert [s["status"] for s in lease.steps] == ["ok", "ok", "ok", "ok", "failed", "ok", "ok"]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(outputs.FILES)
    assert outputs.check(out) == []
    rows = pd.read_csv(out / outputs.ROWS)
    assert set(rows[rows.table == "lease"].step) == {1, 2, 3, 4, 5, 6, 7}
    db = sqlite3.connect(str(out / outputs.DB))
    kinds = dict(db.execute("SELECT step, COUNT(*) FROM lease WHERE kind = 'fake' GROUP BY step"))
    assert kinds == {1: 1, 2: 1, 3: 1, 4: 1, 6: 1}
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one file, no WAL
    log = (out / outputs.LOG).read_text()
    assert "step 5: failed" in log and "a broken step" in log and "lease finished" in log
    readme = (out / outputs.README).read_text()
    assert "Interpreter dry run" in readme and "| 5. batch-64 tuning" in readme


def test_a_step_that_would_overrun_the_deadline_is_skipped_with_one_line(tmp_path,
                                                                         fake_steps):
    said = []
    # 1 s of budget beyond the final reserve: step 1 and 7 need nothing, the rest need more
    lease = _lease(tmp_path, 6.5, lambda text, flush=True: said.append(text))
    lease.run()
    skipped = [line for line in said if "skipped" in line]
    assert skipped and all(line.count("\n") == 0 for line in skipped)
    assert {s["step"] for s in lease.steps if s["status"] == "skipped"} >= {4, 5, 6}
    rows = pd.read_csv(tmp_path / "out" / outputs.ROWS)
    assert set(rows[(rows.table == "lease") & (rows.kind == "step")].step) == set(range(1, 8))


def test_a_lease_stopped_from_outside_still_writes_what_it_measured(tmp_path, monkeypatch,
                                                                   fake_steps):
    from harness.lease import Cut

    def stopped(lease, step, until):
        raise Cut()

    monkeypatch.setattr(fake_steps, "compile_all", stopped)
    lease = _lease(tmp_path, 60, lambda text, flush=True: None)
    lease.run()
    assert [s["status"] for s in lease.steps] == ["ok", "ok", "cut", "ok"]
    db = sqlite3.connect(str(tmp_path / "out" / outputs.DB))
    assert db.execute("SELECT status FROM runs").fetchone()[0] == "stopped"


def test_output_limits_are_checked(tmp_path):
    for i in range(9):
        (tmp_path / f"f{i}.txt").write_text("x")
    (tmp_path / "bad name!.txt").write_text("x")
    bad = outputs.check(tmp_path)
    assert any("at most 8" in b for b in bad) and any("bad name" in b for b in bad)
    big = tmp_path / "log.txt"
    outputs.write_text("y" * (outputs.MAX_BYTES + 10), big)
    assert big.stat().st_size <= outputs.MAX_BYTES


def test_the_lease_path_imports_nothing_of_optuna_or_ray():
    code = ("import sys\nsys.modules['optuna'] = None\nsys.modules['ray'] = None\n"
            "from harness.cli import build_parser, main\nbuild_parser()\n"
            "import harness.lease, harness.lease.steps, harness.lease.summary, harness.capture\n"
            "import harness.lease.programme as p\n"
            "from harness.records import Device\n"
            "p.programme(Device.CUDA_INTERPRET, 1)\n"
            "import torch\n"
            "args = ['lease', '--out', sys.argv[1]] if not torch.cuda.is_available() else "
            "['lease', '--publish', sys.argv[1]]\n"
            "sys.exit(main(args))\n")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / "results" / "never")],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    # without a GPU the lease refuses --device cuda with one line that names --interpret (on
    # a GPU machine: --publish of a folder that holds no lease, which measures nothing)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "--interpret" in r.stderr or "summary.csv" in r.stderr


def test_pytest_outcomes_are_read_with_and_without_xdist():
    from harness.lease.processes import pytest_results

    text = ("tests/test_kernels_triton.py::test_a[x] PASSED [ 50%]\n"
            "[gw1] [100%] FAILED tests/test_kernels_triton.py::test_b \n"
            # parameters with spaces, sharing their first word (the H200 lease counted 22 of 23)
            "[gw0] [ 60%] PASSED tests/test_kernels_triton.py::test_c[8->16 7x7 s2-0.5] \n"
            "[gw2] [ 70%] PASSED tests/test_kernels_triton.py::test_c[8->16 3x3 s1-0.5] \n"
            "3.99s call     tests/test_kernels_triton.py::test_c[8->16 7x7 s2-0.5]\n")
    assert pytest_results(text) == [
        {"kind": "test", "name": "tests/test_kernels_triton.py::test_a[x]", "status": "passed"},
        {"kind": "test", "name": "tests/test_kernels_triton.py::test_b", "status": "failed"},
        {"kind": "test", "name": "tests/test_kernels_triton.py::test_c[8->16 7x7 s2-0.5]",
         "status": "passed"},
        {"kind": "test", "name": "tests/test_kernels_triton.py::test_c[8->16 3x3 s1-0.5]",
         "status": "passed"}]


# ---- what the lease measures and records ---------------------------------------------------
def test_the_gpu_programme_is_the_issues_and_the_dry_run_is_tiny():
    from harness.lease import programme as P
    from harness.records import Device

    gpu_p = P.programme(Device.CUDA, 16)
    assert [lay.name for lay in gpu_p.layers] == ["layer1.0.conv3", "layer2.0.conv2",
                                                  "layer4.0.conv2"]
    assert gpu_p.groups[0] == ("float32", 64) and {b for _, b in gpu_p.groups} == {1, 64}
    assert gpu_p.sparsities == (0.9, 0.9375) and gpu_p.e2e_batches == (64, 1)
    assert gpu_p.e2e_net == "resnet50"
    dry = P.programme(Device.CUDA_INTERPRET, 1)
    cases = P.bench_cases(dry)
    kinds = {c.kernel for c in cases}
    assert {"dense_cudnn", "dense_cudnn_tf32", "dense_triton_implicit_gemm", "cs_triton_direct",
            "ovw_triton_feature_reuse", "bsr_1xn_triton"} <= kinds
    assert any(c.config.get("V") == 64 and c.unsupported is None for c in cases)
    assert all(lay.cin * lay.cout <= 32 * 64 for lay in dry.layers)
    # the tuning screen is known before anything is timed, so step 3 can compile it
    job = P.tune_jobs(dry)[0]
    assert job.screened(dry) == job.screened(dry) and len(job.screened(dry)) == 2


def test_ptx_hot_loop_counts_loads_per_fma_and_per_mma():
    from harness.ptx import ptx_loop_counts

    ptx = """
    ld.global.b32 {%r1}, [%rd1];
$L__BB0_2:                              // =>This Inner Loop Header: Depth=1
    @%p1 ld.global.v4.b32 {%r2, %r3, %r4, %r5}, [%rd2];
    ld.global.b32 {%r6}, [%rd3];
    fma.rn.f32 %r7, %r2, %r6, %r7;
    fma.rn.f32 %r8, %r3, %r6, %r8;
    fma.rn.f32 %r9, %r4, %r6, %r9;
    fma.rn.f32 %r10, %r5, %r6, %r10;
    @%p2 bra $L__BB0_2;
    st.global.b32 [%rd4], %r7;
"""
    c = ptx_loop_counts(ptx)
    assert (c["loop_ld_global"], c["loop_fma"], c["loop_mma"]) == (2, 4, 0)
    assert c["loads_per"] == "fma" and c["loads_per_op"] == 0.5 and c["bytes_per_op"] == 5.0
    mma = ptx.replace("fma.rn.f32", "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32")
    assert ptx_loop_counts(mma)["loads_per"] == "mma"


def test_cudnn_version_keys_gpu_cases_only(monkeypatch):
    from kernel_check import layer

    import kernels
    from harness import cases
    from harness.records import Device

    monkeypatch.setattr(gpu, "cudnn_version", lambda: "91002")
    lay = layer(16, 32, 3, 1, 1)
    k = kernels.get("dense_cudnn")
    gpu_case = cases.make_case(lay, k, 0.0, {"layout": "nchw"}, 1, "float32", Device.CUDA, 1)
    cpu_case = cases.make_case(lay, kernels.get("dense_cpu"), 0.0, {"layout": "nchw"}, 1,
                               "float32", Device.CPU, 1)
    interp = cases.make_case(lay, k, 0.0, {"layout": "nchw"}, 1, "float32",
                             Device.CUDA_INTERPRET, 1)
    assert json.loads(gpu_case.key)["cudnn"] == "91002"
    assert "cudnn" not in json.loads(cpu_case.key) and "cudnn" not in json.loads(interp.key)


def test_gpu_watch_records_clocks_and_other_processes(monkeypatch):
    seen = iter([[{"pid": os.getpid(), "used_mib": 500}, {"pid": 4242, "used_mib": 9000}],
                 [{"pid": os.getpid(), "used_mib": 500}]])
    clocks = iter([{"sm_mhz": 1980, "mem_mhz": 3201, "sm_max_mhz": 1980, "mem_max_mhz": 3201,
                    "temp_c": 40, "power_w": 120.0},
                   {"sm_mhz": 1755, "mem_mhz": 3201, "sm_max_mhz": 1980, "mem_max_mhz": 3201,
                    "temp_c": 52, "power_w": 600.0}])
    monkeypatch.setattr(gpu, "processes", lambda index=None: next(seen))
    monkeypatch.setattr(gpu, "clocks", lambda index=None: next(clocks))
    got = gpu.Watch().finish()
    assert json.loads(got["gpu_clocks"])["sm_mhz"] == [1980, 1755]
    others = json.loads(got["gpu_others"])
    assert others["others"] == [{"pid": 4242, "used_mib": 9000}] and others["self_listed"]


def test_without_nvml_the_gpu_columns_stay_empty(monkeypatch):
    monkeypatch.setattr(gpu, "_nvml", lambda: None)
    assert gpu.clocks() is None and gpu.processes() is None
    assert gpu.Watch().finish() == {"gpu_clocks": None, "gpu_others": None}


def test_the_fingerprint_does_not_build_the_cpu_kernels():
    code = ("from harness import env\nfp = env.fingerprint()\n"
            "import kernels.cs_cpu, kernels.block_cpu, kernels.cci_cpu\n"
            "from kernels import _ext\n"
            "assert len(_ext.FAMILIES) >= 5, _ext.FAMILIES\n"
            "assert not any(f.loaded for f in _ext.FAMILIES), 'the C++ kernels were built'\n"
            "print(fp['kernel_isa'])\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() in ("avx512", "portable(avx2)", "portable", "None")


def test_summary_checks_the_issues_targets():
    from harness.lease import summary

    rows = [{"what": "layer", "layer": name, "batch": 64, "dtype": "float32",
             "sparsity": 0.9375, "kernel": "cs_triton_direct", "config": "{}", "x_cudnn": x,
             "frac_ceiling": 0.3, "status": "ok"}
            for name, x in (("layer1.0.conv3", 4.5), ("layer2.0.conv2", 3.4),
                            ("layer4.0.conv2", 1.0))]
    rows.append({"what": "layer", "layer": "layer2.0.conv2", "batch": 64, "dtype": "float32",
                 "sparsity": 0.9, "kernel": "ovw_triton_feature_reuse",
                 "config": json.dumps({"V": 64}), "x_cudnn": 2.5, "status": "ok"})
    said = summary.targets(pd.DataFrame(rows))
    assert "met (2 of 3)" in " ".join(said)
    assert any("layer2.0.conv2: 2.50x" in s and "met" in s for s in said if "OVW" in s)
    assert any("layer4.0.conv2: not measured" in s for s in said if "OVW" in s)


# ---- the stand-in compile and the dry run -------------------------------------------------
def test_capture_compiles_a_launch_for_sm90_without_a_gpu(tmp_path):
    from kernel_check import layer

    from harness.capture import CompileJob

    job = CompileJob("ovw_triton_feature_reuse", layer(32, 64, 3, 1, 1, h=6), 2, "float16",
                     0.9, {"V": 64})
    src, sink = tmp_path / "jobs.json", tmp_path / "rows.jsonl"
    src.write_text(json.dumps([job.to_json()]))
    env = _env(TRITON_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "harness.capture", "--arch", "90", "--jobs", "1",
                        "--in", str(src), "--out", str(sink)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = [json.loads(line) for line in sink.read_text().splitlines()]
    assert row["status"] == "ok" and row["function"] == "ovw_feature_reuse_kernel"
    assert row["registers"] > 0 and row["shared"] > 0 and row["loop_mma"] > 0
    assert json.loads(row["config"])["V"] == 64  # the full configuration, not the pinned part
    assert any((tmp_path / "cache").rglob("*.cubin"))  # into the lease's Triton cache


@pytest.mark.slow
def test_the_interpreter_dry_run_runs_every_step_within_five_minutes(tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "harness", "lease", "--device", "cuda",
                        "--interpret", "--out", str(out), "--deadline", "290"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=600)
    took = time.monotonic() - t0
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    log = (out / outputs.LOG).read_text()
    ends = [line for line in log.splitlines() if re.search(r"\] step \d: ", line)]
    assert not re.search(r"== step \d \(.*\): skipped", log), log[-3000:]
    assert len(ends) == 6 and all(": ok in" in line for line in ends), "\n".join(ends)
    assert took < 300, f"the dry run took {took:.0f} s"
    assert sorted(p.name for p in out.iterdir()) == sorted(outputs.FILES)
    assert outputs.check(out) == []
    for n in range(1, 7):
        assert f"== step {n} " in log and f"step {n}: ok" in log
    rows = pd.read_csv(out / outputs.ROWS, low_memory=False)
    assert set(rows.step) == set(range(1, 8))
    assert set(rows.table) == {"lease", "measurements", "tuning", "e2e"}
    db = sqlite3.connect(str(out / outputs.DB))
    assert {s for (s,) in db.execute("SELECT DISTINCT step FROM lease")} == set(range(1, 8))
    for table in ("measurements", "tuning", "e2e"):
        assert db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] > 0
    assert db.execute("SELECT COUNT(*) FROM measurements WHERE timing_mode = 'host'"
                      ).fetchone()[0] > 0
    summary = pd.read_csv(out / outputs.SUMMARY)
    assert set(summary.step) == set(range(1, 8)) and (summary.device == "cuda-interpret").all()
    assert "Interpreter dry run" in (out / outputs.README).read_text()


def test_the_report_shows_published_gpu_results_labelled_and_leaves_out_dry_runs(tmp_path):
    from kernel_check import layer

    import kernels
    from harness import cases, report
    from harness.records import CaseResult, Device, Measurement, Status
    from harness.store import Store

    store = Store(tmp_path / "r.sqlite")
    case = cases.make_case(layer(16, 16, 3, 1, 1), kernels.get("dense_cpu"), 0.0,
                           {"layout": "nchw"}, 1, "float32", Device.CPU, 1)
    store.add(Measurement.of(case, CaseResult(Status.OK, median_s=1e-3, kernel_median_s=1e-3),
                             store.start_run({}, "f", "m", {}), "f", "m"))
    store.close()
    base = {"batch": 64, "dtype": "float32", "status": "ok", "driver": "580.1",
            "torch": "2.11", "triton": "3.6", "cudnn": "91002", "commit": "abcdef1234567",
            "date": "2026-12-01"}
    published = tmp_path / "published"
    for folder, device, gpu_name in (("2026-12-01_NVIDIA-H200", "cuda", "NVIDIA H200"),
                                     ("dry", "cuda-interpret", None)):
        (published / folder).mkdir(parents=True)
        pd.DataFrame([
            {**base, "step": 1, "what": "ceiling", "kernel": "fp32_fma", "value": 51.2,
             "unit": "TFLOP/s", "device": device, "gpu": gpu_name},
            {**base, "step": 4, "what": "layer", "layer": "layer2.0.conv2", "sparsity": 0.9375,
             "kernel": "cs_triton_direct", "us": 41.5, "x_cudnn": 3.61, "frac_ceiling": 0.21,
             "device": device, "gpu": gpu_name}]).to_csv(published / folder / "summary.csv",
                                                          index=False)
    html = report.build(tmp_path / "r.sqlite", tmp_path / "r.html", None,
                        published).read_text()
    assert "Published GPU results" in html and "NVIDIA H200" in html
    assert "results/published/2026-12-01_NVIDIA-H200" in html and "3.61" in html
    assert "fp32_fma 51.2 TFLOP/s" in html and "results/published/dry" not in html
