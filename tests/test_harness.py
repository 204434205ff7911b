"""Harness behaviour end to end: crash safety, concurrent writers, typed failures, CLI errors."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness import analysis, timing
from harness.store import Store, StoreError

ROOT = Path(__file__).resolve().parent.parent
SHAPES = """name,cin,cout,kh,kw,stride,padding,h,w
a,32,32,3,3,1,1,10,10
b,64,64,1,1,1,0,8,8
c,32,64,3,3,2,1,12,12
d,64,32,1,1,2,0,9,9
"""
FAST = ["--rounds", "3", "--min-sample", "0.0002", "--no-progress", "--no-confirm", "--nets", "",
        "--threads", "1"]


def env(**extra):
    e = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
         "HARNESS_PLUGINS": "faulty_kernels", **extra}
    return e


def cs_cpu_kernels() -> int:
    """How many CS CPU kernels run here (an autotune measures each one's default)."""
    import kernels

    return sum(kernels.get(k).available() is None for k in kernels.names("cpu", "cs"))


def bench(tmp, *args, db=None, timeout=600, plugins="faulty_kernels", **kw):
    shapes = tmp / "tiny.csv"
    shapes.write_text(SHAPES)
    cmd = [sys.executable, "-m", "harness", "bench", "--shapes-csv", str(shapes),
           "--db", str(db or tmp / "r.sqlite"), *FAST, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(HARNESS_PLUGINS=plugins), capture_output=True,
                          text=True, timeout=timeout, **kw)


def rows(db) -> pd.DataFrame:
    return Store(db, create=False).measurements(latest=False)


def start_bench(tmp, *args, db):
    shapes = tmp / "tiny.csv"
    shapes.write_text(SHAPES)
    cmd = [sys.executable, "-m", "harness", "bench", "--shapes-csv", str(shapes), "--db",
           str(db), *FAST, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_rows(db, n, proc, limit=300):
    t_end = time.time() + limit
    while time.time() < t_end:
        if db.exists():
            try:
                c = sqlite3.connect(db, timeout=30).execute(
                    "SELECT COUNT(*) FROM measurements").fetchone()[0]
                if c >= n:
                    return c
            except sqlite3.OperationalError:
                pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} rows after {limit} s")


SWEEP = ["--kernels", "cs_cpu_direct,bsr_1xn_cpu", "--sparsities", "0.75"]
SWEEP_CASES = 4 * (2 + 1 * 8)  # 4 layers x (2 dense layouts + 1 sparsity x (4 M + 4 N))


def test_kill_9_mid_sweep_then_rerun_records_every_case_exactly_once(tmp_path):
    db = tmp_path / "r.sqlite"
    proc = start_bench(tmp_path, *SWEEP, db=db)
    try:
        wait_rows(db, 12, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = rows(db)
    assert 0 < len(first)
    r = bench(tmp_path, *SWEEP, db=db)
    assert r.returncode == 0, r.stderr
    after = rows(db)
    assert after.case_key.is_unique  # nothing measured twice
    assert set(first.case_key) <= set(after.case_key)  # nothing lost
    assert f"skipped (already measured) {len(first)}" in r.stdout
    assert len(after) == SWEEP_CASES  # the complete sweep
    assert (after.status != "ok").sum() == (after.status == "unsupported").sum()


def test_two_sweeps_writing_one_database_at_once_both_complete(tmp_path):
    db = tmp_path / "r.sqlite"
    a = start_bench(tmp_path, "--kernels", "cs_cpu_direct", "--sparsities", "0.75", db=db)
    b = start_bench(tmp_path, "--kernels", "cci_cpu", "--sparsities", "0.75", db=db)
    for p in (a, b):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    df = rows(db)
    sparse = df[df.pattern != "dense"]
    assert len(sparse[sparse.kernel == "cs_cpu_direct"]) == 4 * 4  # 4 layers x 4 M
    assert len(sparse[sparse.kernel == "cci_cpu"]) == 4 * 4  # 4 layers x 4 G
    assert (sparse.status.isin(["ok", "unsupported"])).all()
    runs = Store(db).runs()
    assert list(runs.status) == ["finished", "finished"]


def test_faulty_kernels_are_recorded_with_typed_status_and_the_sweep_completes(tmp_path):
    r = bench(tmp_path, "--kernels",
              "faulty_raise,faulty_wrong,faulty_hang,faulty_crash,faulty_prepare,cs_cpu_direct",
              "--sparsities", "0.5", "--layers", "a", "--case-timeout", "8")
    assert r.returncode == 0, r.stderr
    df = rows(tmp_path / "r.sqlite").set_index("kernel")
    assert df.loc["faulty_raise", "status"] == "runtime_error"
    assert "deliberate failure" in df.loc["faulty_raise", "reason"]
    assert df.loc["faulty_wrong", "status"] == "incorrect"
    assert 0.009 < df.loc["faulty_wrong", "rel_err"] < 0.011
    assert np.isnan(df.loc["faulty_wrong", "median_s"])  # never timed
    assert df.loc["faulty_hang", "status"] == "timeout"
    assert df.loc["faulty_crash", "status"] == "runtime_error"
    assert "exit code 3" in df.loc["faulty_crash", "reason"]
    assert df.loc["faulty_prepare", "status"] == "runtime_error"
    assert "cannot encode" in df.loc["faulty_prepare", "reason"]
    # the healthy kernel after them still ran, on a fresh worker
    cs = df.loc["cs_cpu_direct"]
    assert set(cs.status) == {"ok"} and (cs.rel_err < 1e-5).all()


def test_ctrl_c_stops_after_the_case_in_flight_and_keeps_results(tmp_path):
    db = tmp_path / "r.sqlite"
    proc = start_bench(tmp_path, *SWEEP, db=db)
    wait_rows(db, 6, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopping after the case in flight" in err
    df = rows(db)
    assert 6 <= len(df) < SWEEP_CASES
    assert Store(db).runs().status.iloc[-1] == "stopped"
    assert "not run (stopped)" in out


@pytest.mark.parametrize("args,message", [
    (["--nets", "alexnet"], "unknown net 'alexnet'; valid: resnet50"),
    (["--kernels", "nope"], "unknown kernel 'nope'"),
    (["--kernels", "dense_cudnn"], "do not run on --device cpu"),
    (["--sparsities", "1.5"], r"sparsity 1.5 is outside \(0, 1\)"),
    (["--sparsities", "0"], r"outside \(0, 1\)"),
    (["--sparsities", "abc"], "is not a number"),
    (["--batch", "0"], "--batch: must be >= 1, got 0"),
    (["--rounds", "0"], "--rounds: must be >= 1, got 0"),
    (["--case-timeout", "-1"], "--case-timeout: must be > 0, got -1"),
    (["--threads", "0"], "--threads: must be >= 1, got 0"),
    (["--threads", "two"], "--threads: 'two' is not an integer"),
    (["--min-sample", "-0.1"], "--min-sample: must be >= 0"),
    (["--device", "cuda"], "no CUDA device on this machine; add --interpret"),
    (["--interpret"], "use it with --device cuda"),
    (["--patterns", "zz"], "unknown pattern 'zz'"),
    (["--layers", "layer9.9.conv9"], "unknown layer"),
    (["--shard", "3/2"], "need 0 <= i < n"),
    (["--dtype", "int8"], "invalid choice"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_cli_input_exits_2_with_one_line(cli, args, message):
    code, _, err = cli("bench", "--db", "/nonexistent/x.db", *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    import re
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("content,message", [
    (b"this is not a database at all" * 100, "is not a results database"),
    (b"SQLite format 3\x00" + random.Random(0).randbytes(4000), "is not a results database"),
    (None, "SQLite file of another program"),
], ids=["text", "sqlite-header-then-noise", "another-program"])
def test_foreign_or_corrupt_database_exits_2(tmp_path, cli, content, message):
    db = tmp_path / "x.sqlite"
    if content is None:
        c = sqlite3.connect(db)
        c.execute("CREATE TABLE invoices (id INTEGER)")
        c.commit()
        c.close()
    else:
        db.write_bytes(content)
    (tmp_path / "tiny.csv").write_text(SHAPES)
    code, _, err = cli("bench", "--shapes-csv", tmp_path / "tiny.csv", "--db", db, *FAST,
                       "--kernels", "cs_cpu_direct", "--sparsities", "0.5")
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_list_kernels_and_export(tmp_path, cli):
    r = bench(tmp_path, "--kernels", "cs_cpu_direct", "--sparsities", "0.5", "--layers", "b")
    assert r.returncode == 0, r.stderr
    plain = {k: v for k, v in env().items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "harness", "list", "kernels"], cwd=ROOT,
                         env=plain, capture_output=True, text=True, timeout=300)
    assert "cs_cpu_direct" in out.stdout and "no CUDA device" in out.stdout
    out = subprocess.run([sys.executable, "-m", "harness", "list", "kernels"], cwd=ROOT,
                         env={**plain, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert "interpreter only" in out.stdout
    for fmt in ("csv", "parquet"):
        dest = tmp_path / f"out.{fmt}"
        code, _, err = cli("export", "--format", fmt, "--db", tmp_path / "r.sqlite", "--out",
                           dest)
        assert code == 0, err
        df = pd.read_csv(dest) if fmt == "csv" else pd.read_parquet(dest)
        assert len(df) == 2 + 4 and {"speedup", "kernel_speedup", "status"} <= set(df.columns)


def test_measurements_carry_the_machine_fingerprint(tmp_path):
    r = bench(tmp_path, "--kernels", "cs_cpu_direct", "--sparsities", "0.5", "--layers", "b")
    assert r.returncode == 0, r.stderr
    store = Store(tmp_path / "r.sqlite")
    run = store.runs().iloc[0]
    fp = json.loads(run.fingerprint)
    for key in ("cpu", "cpu_isa", "cores", "torch", "triton", "numpy", "git_commit",
                "git_dirty", "gpu"):
        assert key in fp
    df = store.measurements()
    assert (df.fp_hash == run.fp_hash).all() and (df.threads == 1).all()
    ok = df[df.status == "ok"]
    assert (ok.median_s > 0).all() and ok.samples.map(lambda s: len(json.loads(s)) >= 3).all()


# ---- units ----------------------------------------------------------------------------------
def test_stats_match_numpy_and_flag_noise():
    xs = [1.0, 1.1, 0.9, 1.05, 0.95, 3.0, 1.0]
    st = timing.stats(xs, reps=4)
    assert st.median == np.median(xs)
    q1, q3 = np.percentile(xs, [25, 75])
    assert st.iqr == pytest.approx(q3 - q1)
    assert (st.min, st.max, st.rounds, st.reps) == (0.9, 3.0, 7, 4)
    assert st.noisy == ((q3 - q1) / np.median(xs) > 0.10)
    assert not timing.stats([1.0, 1.01, 0.99, 1.0]).noisy


def test_interleaved_timing_alternates_variants_each_block_after_an_untimed_call(monkeypatch):
    order, timed = [], []
    variants = {k: (lambda a, k=k: order.append(k), None) for k in "ABC"}
    real = timing._time_reps
    st, samples = timing.interleaved_cpu(variants, rounds=3, min_sample=0.0, warmup=0.0)
    assert order[-18:] == [k for k in "ABC" for _ in range(2)] * 3  # untimed, then timed
    assert {k: len(v) for k, v in samples.items()} == {"A": 3, "B": 3, "C": 3}
    monkeypatch.setattr(timing, "_time_reps",
                        lambda fn, arg, reps: timed.append(len(order)) or real(fn, arg, reps))
    # each timed block starts right after the untimed call of its own variant
    timing.interleaved_cpu(variants, rounds=2, min_sample=0.0, warmup=0.0)
    assert all(order[i - 1] == order[i] for i in timed), (order, timed)
    # under Triton's interpreter (one call per round) there is no untimed call
    order.clear()
    timing.interleaved_cpu(variants, rounds=2, min_sample=0.0, warmup=0.0, max_reps=1)
    assert order[-6:] == list("ABC") * 2


def test_timer_overhead_is_negligible_against_the_minimum_sample():
    assert timing.timer_overhead() < 2e-3 * 1e-3


def _row(layer, pattern, S, kernel, median, dense, count=1, status="ok", kmed=None, dk=None,
         layout="nchw"):
    return {"fp_hash": "f", "net": "n", "layer": layer, "batch": 1, "dtype": "float32",
            "device": "cpu", "threads": 2, "pattern": pattern, "sparsity": S, "kernel": kernel,
            "config": json.dumps({"layout": layout}), "status": status, "median_s": median,
            "kernel_median_s": kmed or median, "dense_median_s": dense,
            "dense_kernel_median_s": dk or dense, "count": count, "shape": "s", "flops": 1e9,
            "layer_index": 0}


def test_network_speedup_weights_by_count_and_counts_uncovered_layers_at_dense():
    df = pd.DataFrame([
        _row("L1", "dense", 0.0, "dense_cpu", 10.0, None, count=3),
        _row("L1", "dense", 0.0, "dense_cpu", 12.0, None, count=3, layout="channels_last"),
        _row("L2", "dense", 0.0, "dense_cpu", 5.0, None, count=1),
        _row("L1", "cs", 0.5, "k", 2.0, 8.0, count=3),  # interleaved: 4x
        _row("L1", "cs", 0.5, "k2", 4.0, 8.0, count=3),  # worse config of the same layer
        _row("L2", "cs", 0.5, "k", None, None, status="unsupported"),
    ])
    net = analysis.network_table(df)
    (r,) = net.to_dict("records")
    # dense: 3*10 + 5 = 35; sparse: 3*10/4 + 5 (L2 at dense) = 12.5
    assert r["speedup"] == pytest.approx(35 / 12.5)
    assert r["covered"] == 1 and r["at_dense"] == "L2"


def test_a_case_its_stored_row_and_the_baseline_share_one_group_key():
    """What may be compared is one typed key: a case's group, its stored row's group (less the
    run's identity) and the baseline's group columns all name the same fields."""
    from harness import baseline, cases
    from harness.records import Device, GroupKey
    from shapes import ConvLayer

    lay = ConvLayer(net="t", name="L1", index=0, cin=8, cout=8, kh=3, kw=3, stride=1, padding=1,
                    h=6, w=6)
    (case,) = [c for c in cases.build([lay], [0.5], ["dense_cpu"], 2, "float32", Device.CPU, 3)
               if dict(c.config)["layout"] == "nchw"]
    row = pd.Series({"fp_hash": "abc", "net": "t", "layer": "L1", "batch": np.int64(2),
                     "dtype": "float32", "device": "cpu", "threads": np.int64(3)})
    assert GroupKey.of_row(row, identity=False) == case.group
    assert GroupKey.of_row(row) == GroupKey("t", "L1", 2, "float32", "cpu", 3, identity="abc")
    assert baseline.GROUP == GroupKey.columns() == [
        "fp_hash", "net", "layer", "batch", "dtype", "device", "threads"]
    assert analysis.GROUP == [c for c in GroupKey.columns() if c != "layer"]
    b = baseline.Baselines()
    b.note(GroupKey.of_row(row, identity=False), "dense_cpu", case.config, 1e-3)
    assert b.ref(case.group).layout == "nchw"


def test_store_refuses_other_schema_versions(tmp_path):
    db = tmp_path / "s.sqlite"
    Store(db).close()
    c = sqlite3.connect(db)
    c.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    c.commit()
    c.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store(db)
    with pytest.raises(StoreError, match="no results database"):
        Store(tmp_path / "missing.sqlite", create=False)


def test_processes_creating_one_new_database_at_once_all_open_it(tmp_path):
    # creating the schema and its meta rows is one transaction: no process may see tables
    # without the rows that say whose database it is
    code = ("import sys, time; from harness.store import Store; t = float(sys.argv[2]); "
            "time.sleep(max(0.0, t - time.time())); Store(sys.argv[1])")
    for attempt in range(3):
        db, start = tmp_path / f"new{attempt}.sqlite", time.time() + 4
        procs = [subprocess.Popen([sys.executable, "-c", code, str(db), str(start)], cwd=ROOT,
                                  env=env(), stderr=subprocess.PIPE, text=True)
                 for _ in range(6)]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, errors
        assert Store(db).runs().empty


def test_probe_sets_the_inner_loop_against_dense_gemm():
    r = subprocess.run([sys.executable, "-m", "harness", "probe", "--sizes", "16,64", "--tiles",
                        "2,4", "--rounds", "1", "--fmas", "100000", "--sparsity", "0.75"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.split()[2:3] in (["aligned"],
                                                                              ["straddling"])]
    # every working set x tile x alignment, once
    assert sorted((int(a[0]), int(a[1]), a[2]) for a in rows) == sorted(
        (kb, t, al) for kb in (16, 64) for t in (2, 4) for al in ("aligned", "straddling"))
    import re
    dense = re.search(r"dense fp32 GEMM in the same run: ([\d.]+) GFLOP/s on (\d+) thread\(s\) = "
                      r"([\d.]+) ns per vector FMA per thread", r.stdout)
    gflops, threads, dense_ns = float(dense[1]), int(dense[2]), float(dense[3])
    # a vector FMA is 2 x 16 lanes (AVX-512) or 2 x 8 FLOP; one thread does 1/threads of them
    lanes = int(re.search(r"\((\d+) lanes\)", r.stdout)[1])
    assert dense_ns == pytest.approx(threads * 2 * lanes / gflops, rel=0.02, abs=2e-3)
    for row in rows:  # against dense = dense ns / loop ns; ceiling = that / kept fraction
        ns, xdense, ceiling = float(row[3]), float(row[-2]), float(row[-1])
        assert ns > 0 and xdense == pytest.approx(dense_ns / ns, rel=0.02, abs=0.01)
        assert ceiling == pytest.approx(xdense / 0.25, abs=0.05)


@pytest.mark.parametrize("args,message", [
    (["--tiles", "5"], "--tiles: 5 is not one of 1, 2, 3, 4, 6, 8"),
    (["--sizes", "0"], "--sizes: positive integers"),
    (["--sizes", "big"], "--sizes: a comma list of integers"),
    (["--sparsity", "1"], r"--sparsity must be in \[0, 1\)"),
    (["--rounds", "0"], "--rounds: must be >= 1"),
    (["--sizes", "4194304"], r"--sizes: at most 1048576 KiB \(1 GiB\) per thread"),
    (["--threads", "100000"], "--threads: this machine has"),
    (["--fmas", str(10**30)], "--fmas: at most"),
])
def test_probe_bad_input_exits_2_with_one_line(cli, args, message):
    code, _, err = cli("probe", *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    import re
    assert re.search(message, lines[0]), lines[0]
