"""Every failure is one line and touches nothing: foreign and corrupt files, full disks and
read-only places, broken plugins and plans, signals, merge, inputs that do no work."""

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import descendants, reaped, stop, wait_gone
from test_harness import ROOT, SHAPES, env, start_bench, wait_rows

import kernels
import shapes
from harness import cases, plan
from harness.records import CaseResult, Device, Measurement, Status
from harness.store import Store

AS_ROOT = os.geteuid() == 0


# ---- helpers -------------------------------------------------------------------------------
def one_error_line(err: str, pattern: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_layer(name="a", net="tiny"):
    return shapes.ConvLayer(net=net, name=name, index=0, cin=32, cout=32, kh=3, kw=3, stride=1,
                            padding=1, h=10, w=10)


def results_db(path: Path, layer_name="a", rows=1) -> Path:
    """A results database holding, per copy, a layer's dense baseline and a CS case, both ok
    (made without measuring anything)."""
    store = Store(path)
    fp = {"cpu": "test cpu", "cores": 2, "cpu_isa": [], "gpu": None}
    run_id = store.start_run(fp, "f" * 16, "m" * 16, {})
    cs = kernels.get("cs_cpu_direct")
    dense = kernels.get("dense_cpu")
    for i in range(rows):
        lay = tiny_layer(layer_name if rows == 1 else f"{layer_name}{i}")
        dcase = cases.make_case(lay, dense, 0.0, {"layout": "nchw"}, 1, "float32", Device.CPU, 1)
        scase = cases.make_case(lay, cs, 0.5, cs.default_config(lay, 0.5), 1, "float32",
                                Device.CPU, 1)
        for case, t in ((dcase, 2e-3), (scase, 1e-3)):
            res = CaseResult(Status.OK, None, rel_err=1e-7, median_s=t, iqr_s=0.0, min_s=t,
                             noisy=False, reps=1, samples=(t, t, t), kernel_median_s=t,
                             dense_median_s=2e-3, dense_kernel_median_s=2e-3)
            store.add(Measurement.of(case, res, run_id, "f" * 16, "m" * 16))
    store.finish_run(run_id)
    store.close()
    return path


def rollback_journal(path: Path) -> Path:
    """The same database in SQLite's rollback-journal mode (header bytes 18-19 = 1, 1), so that
    a switch to WAL shows in the file itself."""
    c = sqlite3.connect(path)
    c.execute("PRAGMA journal_mode = DELETE")
    c.close()
    assert path.read_bytes()[18:20] == b"\x01\x01"
    return path


def corrupt_page(path: Path, table="measurements") -> Path:
    """Overwrite the content of ``table``'s root page (its header stays readable)."""
    c = sqlite3.connect(path)
    root, = c.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()
    page, = c.execute("PRAGMA page_size").fetchone()
    c.close()
    data = bytearray(path.read_bytes())
    start = (root - 1) * page
    data[start + 12:start + page] = bytes((7 * i + 3) & 0xFF for i in range(page - 12))
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (as root); yields a function that mounts one of ``size`` bytes,
    read-only when asked, and unmounts them all afterwards."""
    mounted = []

    def mount(name, size=1 << 20, readonly=False):
        where = tmp_path / name
        where.mkdir()
        opts = f"size={size}" + (",ro" if readonly else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=True)
        mounted.append(where)
        return where
    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def tiny_csv(tmp_path: Path, text: str = SHAPES) -> Path:
    f = tmp_path / "tiny.csv"
    f.write_text(text)
    return f


def bench_args(tmp_path, *args, db=None):
    return ["bench", "--shapes-csv", tiny_csv(tmp_path), "--nets", "", "--no-progress",
            "--no-confirm", "--threads", "1", "--db", db or tmp_path / "r.sqlite", *args]


# ---- 1. a refused file is not modified; reading commands open the database read-only ---------
@pytest.mark.parametrize("kind", ["other tables", "other program's meta"])
def test_a_foreign_sqlite_file_is_refused_byte_for_byte_unmodified(tmp_path, cli, kind):
    db = tmp_path / "other.db"
    c = sqlite3.connect(db)
    if kind == "other tables":
        c.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    else:
        c.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        c.execute("INSERT INTO meta VALUES ('app', 'someone-else')")
    c.commit()
    c.close()
    before = digest(db)
    code, _, err = cli(*bench_args(tmp_path, "--kernels", "cs_cpu_direct", "--sparsities", "0.5",
                                   db=db))
    assert code == 2
    one_error_line(err, "another program|belongs to 'someone-else'")
    assert digest(db) == before  # header bytes 18-19 still say rollback journal, not WAL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db", "tiny.csv"]


def test_reading_commands_leave_the_database_as_it_was(tmp_path, cli):
    db = rollback_journal(results_db(tmp_path / "r.sqlite"))
    c = sqlite3.connect(db)  # as an older release left it: no e2e table
    c.execute("DROP TABLE e2e")
    c.commit()
    c.close()
    before = digest(db)
    for argv in (["report", "--db", db, "--out", tmp_path / "x.html", "--plans", tmp_path],
                 ["export", "--db", db, "--out", tmp_path / "x.csv"],
                 ["table", "--db", db, "--net", "tiny"],
                 ["merge", db, "-o", tmp_path / "m.sqlite"]):
        code, _, err = cli(*argv)
        assert code == 0, (argv[0], err)
        assert digest(db) == before, argv[0]
    assert not Path(f"{db}-wal").exists() and not Path(f"{db}-shm").exists()


# ---- 2. tracebacks become one `error:` line, exit 2 -------------------------------------------
BOOM_PLUGIN = "raise RuntimeError('plugin boom at import')\n"


@pytest.mark.parametrize("plugin,message", [
    ("no_such_plugin", "HARNESS_PLUGINS names 'no_such_plugin', which is not an importable module"),
    ("boom_plugin", "plugin 'boom_plugin' .* failed as it was imported: RuntimeError: plugin boom"),
])
def test_a_broken_plugin_is_one_error_line(tmp_path, plugin, message):
    (tmp_path / "boom_plugin.py").write_text(BOOM_PLUGIN)
    r = subprocess.run([sys.executable, "-m", "harness", "list", "kernels"], cwd=ROOT,
                       env={**env(HARNESS_PLUGINS=plugin),
                            "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    one_error_line(r.stderr, message)


FULL_DISK = """
import os, resource, sys
from harness.cli import main
limit = int(os.environ.get("LIMIT_FSIZE", "0"))
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(sys.argv[1:]))
"""


def test_db_on_a_full_disk_is_one_error_line(tmp_path):
    """On a small tmpfs that is full (as root), else under a file-size limit."""
    if AS_ROOT:
        disk = tmp_path / "disk"
        disk.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
        try:
            with open(disk / "filler", "wb") as f:
                try:
                    f.write(b"\0" * (60 << 10))
                except OSError:
                    pass
            db = disk / "r.sqlite"
            r = subprocess.run([sys.executable, "-c", FULL_DISK, *map(str, bench_args(
                tmp_path, "--kernels", "cs_cpu_direct", "--sparsities", "0.5", db=db))],
                cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
        finally:
            subprocess.run(["umount", "-l", str(disk)], check=False)
    else:
        db = tmp_path / "r.sqlite"
        r = subprocess.run([sys.executable, "-c", FULL_DISK, *map(str, bench_args(
            tmp_path, "--kernels", "cs_cpu_direct", "--sparsities", "0.5", db=db))],
            cwd=ROOT, env=env(LIMIT_FSIZE=str(16 << 10)), capture_output=True, text=True,
            timeout=120)
    assert r.returncode == 2, r.stderr
    one_error_line(r.stderr, r"cannot write .*r\.sqlite: (the disk is full|disk I/O error)")


def read_only_folder(tmp_path, tmpfs):
    """A read-only tmpfs where we are root (root writes through permission bits), else a
    folder without write permission."""
    if AS_ROOT:
        return tmpfs("ro", readonly=True)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_db_under_a_read_only_folder_is_one_error_line(tmp_path, cli, tmpfs):
    folder = read_only_folder(tmp_path, tmpfs)
    code, _, err = cli(*bench_args(tmp_path, "--kernels", "cs_cpu_direct", "--sparsities",
                                   "0.5", db=folder / "r.sqlite"))
    assert code == 2
    one_error_line(err, "cannot write .*r.sqlite: it or its folder is read-only")


def test_db_whose_parent_is_a_file_is_one_error_line(tmp_path, cli):
    (tmp_path / "afile").write_text("x")
    code, _, err = cli(*bench_args(tmp_path, "--kernels", "cs_cpu_direct", "--sparsities",
                                   "0.5", db=tmp_path / "afile" / "r.sqlite"))
    assert code == 2
    one_error_line(err, "afile is a file, not a folder")


@pytest.mark.parametrize("command", ["report", "export"])
def test_out_naming_a_folder_is_one_error_line(tmp_path, cli, command):
    db = results_db(tmp_path / "r.sqlite")
    (tmp_path / "adir").mkdir()
    code, _, err = cli(command, "--db", db, "--out", tmp_path / "adir")
    assert code == 2
    one_error_line(err, "--out .*adir is a folder; name a file")


@pytest.mark.parametrize("command", ["report", "export"])
def test_out_in_a_read_only_place_is_one_error_line(tmp_path, cli, tmpfs, command):
    db = results_db(tmp_path / "r.sqlite")
    folder = read_only_folder(tmp_path, tmpfs)
    code, _, err = cli(command, "--db", db, "--out", folder / "x.out")
    assert code == 2
    one_error_line(err, "cannot write --out .*x.out: (Read-only file system|Permission denied)")


@pytest.mark.parametrize("command", ["report", "export", "table", "bench", "merge"])
def test_a_corrupt_page_is_one_error_line_that_points_at_recovery(tmp_path, cli, command):
    db = corrupt_page(rollback_journal(results_db(tmp_path / "r.sqlite", rows=40)))
    argv = {"report": ["report", "--db", db, "--out", tmp_path / "x.html"],
            "export": ["export", "--db", db, "--out", tmp_path / "x.csv"],
            "table": ["table", "--db", db, "--net", "tiny"],
            "bench": bench_args(tmp_path, "--kernels", "cs_cpu_direct", "--sparsities", "0.5",
                                "--layers", "a", db=db),
            "merge": ["merge", db, "-o", tmp_path / "m.sqlite"]}[command]
    code, _, err = cli(*argv)
    assert code == 2
    one_error_line(err, r"r\.sqlite is corrupt \(SQLite says: database disk image is malformed\)"
                        r".*sqlite3 .*r\.sqlite \.recover")


@pytest.mark.parametrize("command", ["report", "export"])
def test_text_that_is_not_utf8_is_reported_as_corrupt(tmp_path, cli, command):
    db = results_db(tmp_path / "r.sqlite")
    c = sqlite3.connect(db)
    c.execute("UPDATE measurements SET reason = CAST(x'c3ff41' AS TEXT)")
    c.commit()
    c.close()
    code, _, err = cli(command, "--db", db, "--out", tmp_path / "x.out")
    assert code == 2
    one_error_line(err, r"r\.sqlite is corrupt \(SQLite says: Could not decode to UTF-8")


def _good_plan():
    from test_autotune import make_plan
    return make_plan()


BAD_PLANS = [
    ("layers are not objects", lambda p: p.update(layers=[1, 2]), "plan layer 0 must be an object"),
    ("device tpu", lambda p: p.update(device="tpu"), "plan device 'tpu' is not one of cpu, cuda"),
    ("count 0", lambda p: p["layers"][0].update(count=0), r"count 0 must be >= 1"),
    ("threads 0", lambda p: p.update(threads=0), "plan threads 0 must be >= 1"),
    ("NaN time", lambda p: p["layers"][0].update(time_s=float("nan")),
     "time_s nan must be a positive number"),
    ("sparsity 5", lambda p: p.update(sparsity=5.0), r"plan sparsity 5.0 is outside \(0, 1\)"),
]


@pytest.mark.parametrize("what,change,message", BAD_PLANS, ids=[b[0] for b in BAD_PLANS])
def test_a_plan_file_with_impossible_values_is_refused(tmp_path, cli, what, change, message):
    p = _good_plan()
    change(p)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(p))  # NaN is written as JSON's NaN, as json.dumps does
    with pytest.raises(plan.PlanError, match=message):
        plan.load(path)
    code, _, err = cli("table", "--plan", path, "--db", tmp_path / "r.sqlite")
    assert code == 2
    one_error_line(err, message)
    assert not (tmp_path / "r.sqlite").exists()


def test_one_bad_plan_file_is_skipped_by_report_and_e2e_with_a_warning(tmp_path, cli):
    from harness.cli.e2e import choose_plan

    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / "broken.json").write_text("{not json")
    bad = _good_plan()
    bad["layers"] = [1, 2]
    (plans / "resnet50_cs_0.9375_cpu.json").write_text(json.dumps(bad))
    (plans / "good.json").write_text(json.dumps(_good_plan()))
    db = results_db(tmp_path / "r.sqlite")
    code, out, err = cli("report", "--db", db, "--out", tmp_path / "x.html", "--plans", plans)
    assert code == 0, err
    warnings = sorted(line for line in err.splitlines() if line.startswith("warning: "))
    assert len(warnings) == 2 and "broken.json" in warnings[0] and "resnet50_cs" in warnings[1]
    assert "good.json" in (tmp_path / "x.html").read_text()
    chosen, name, said = choose_plan(plans, "resnet50", "cs", 0.9375, 1, "abc", Device.CPU)
    assert chosen is None and "must be an object" in said and "default configurations" in said


def test_a_layer_name_in_tex_syntax_is_drawn_as_plain_text(tmp_path, cli):
    name = "$\\undefined{$"
    db = results_db(tmp_path / "r.sqlite", layer_name=name)
    code, _, err = cli("report", "--db", db, "--out", tmp_path / "x.html")
    assert code == 0, err
    assert "$\\undefined{$" in (tmp_path / "x.html").read_text()


# ---- 3. SIGTERM is Ctrl-C that abandons the case in flight; workers follow their parent ------
def start_hanging_bench(tmp_path):
    """A sweep whose third case (after layer a's two dense baselines) never ends."""
    db = tmp_path / "r.sqlite"
    proc = start_bench(tmp_path, "--kernels", "faulty_hang", "--sparsities", "0.5", "--layers",
                       "a", "--case-timeout", "600", db=db)
    wait_rows(db, 2, proc, limit=240)
    time.sleep(1.0)  # the hanging case is in the worker now
    workers = descendants(proc.pid)
    assert workers, "no worker process"
    return proc, db, workers


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_sigterm_abandons_the_case_records_the_run_stopped_and_exits_143(tmp_path):
    proc, db, workers = start_hanging_bench(tmp_path)
    with reaped(proc):
        t0 = time.time()
        out, err = stop(proc, signal.SIGTERM, timeout=30)
    assert proc.returncode == 143, err
    assert time.time() - t0 < 15
    assert "Traceback" not in err and "terminated (SIGTERM)" in err
    assert wait_gone(workers) == []
    assert list(Store(db).runs().status) == ["stopped"]
    assert len(Store(db).measurements()) == 2  # the case in flight was abandoned, not stored


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("command", ["e2e", "autotune"])
def test_sigterm_ends_e2e_and_autotune_and_their_workers_with_143(tmp_path, command):
    db = tmp_path / "r.sqlite"
    argv = {"e2e": ["e2e", "--nets", "resnet18", "--patterns", "cs", "--size", "32",
                    "--rounds", "3", "--threads", "1", "--plans", tmp_path, "--db", db,
                    "--engines", "none", "--no-alone"],
            "autotune": ["autotune", "--net", "resnet50", "--layers", "layer4.1.conv2",
                         "--threads", "1", "--budget", "50", "--db", db, "--out-dir",
                         tmp_path / "plans"]}[command]
    proc = subprocess.Popen([sys.executable, "-m", "harness", *map(str, argv)], cwd=ROOT,
                            env=env(HARNESS_PLUGINS=""), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with reaped(proc):
        t_end = time.time() + 240
        while not descendants(proc.pid):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < t_end, "no worker process started"
            time.sleep(0.2)
        time.sleep(2.0)  # the worker is importing, building or measuring
        workers = descendants(proc.pid)
        out, err = stop(proc, signal.SIGTERM, timeout=30)
    assert proc.returncode == 143, out + err
    assert "Traceback" not in err and "terminated (SIGTERM)" in err
    assert wait_gone(workers) == []
    if command == "e2e":
        assert list(Store(db).runs().status) == ["stopped"] and Store(db).e2e().empty
    else:
        assert not (tmp_path / "plans").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_worker_ends_itself_when_its_parent_is_killed(tmp_path):
    proc, db, workers = start_hanging_bench(tmp_path)
    try:
        proc.kill()  # SIGKILL: the driver cannot clean up anything
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert wait_gone(workers, limit=10) == []


# ---- 5. a stopped sweep says so ------------------------------------------------------------
def test_a_stopped_sweep_says_it_stopped_counts_requested_layers_and_exits_130(tmp_path):
    db = tmp_path / "r.sqlite"
    proc = start_bench(tmp_path, "--kernels", "cs_cpu_direct", "--sparsities", "0.5", "--quick",
                       db=db)  # 4 layers x (2 dense layouts + 1 CS case)
    with reaped(proc):
        wait_rows(db, 4, proc, limit=240)  # layer a done, layer b begun
        out, err = stop(proc, signal.SIGINT, timeout=120)
    assert proc.returncode == 130, err
    assert "bench stopped (Ctrl-C)" in out and "bench finished" not in out
    row = next(line for line in out.splitlines() if line.split()[:1] == ["tiny"])
    covered = row.split()[3]
    assert covered.endswith("/4") and covered != "4/4", row  # against the 4 layers asked for
    assert row.split()[4] == "-", row  # no network-level figure from part of the network
    assert list(Store(db).runs().status) == ["stopped"]


# ---- 6. inputs that do no work are refused ------------------------------------------------
HEADER = "name,cin,cout,kh,kw,stride,padding,h,w\n"
NO_WORK = [
    ("empty shapes CSV", ["--shapes-csv", "EMPTY"], "holds no layers"),
    ("header-only shapes CSV", ["--shapes-csv", "HEADER"], "holds no layers"),
    ("pattern without a kernel", ["--patterns", "nm"],
     "no cpu kernel implements pattern.s. nm, so only dense would be measured"),
    ("pattern outside --kernels", ["--patterns", "1xn", "--kernels", "cs_cpu_direct"],
     "no cpu kernel among --kernels implements pattern.s. 1xn"),
    ("--retry-failed with --fresh", ["--retry-failed", "--fresh"], "give one of them"),
    ("more threads than cores", ["--threads", str(max(1000, 2 * (os.cpu_count() or 1)))],
     r"this machine has \d+ cores; .*--force-threads"),
]


@pytest.mark.parametrize("what,args,message", NO_WORK, ids=[n[0] for n in NO_WORK])
def test_inputs_that_do_no_work_are_refused_with_one_line(tmp_path, cli, what, args, message):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text(HEADER)
    args = [{"EMPTY": tmp_path / "empty.csv", "HEADER": tmp_path / "header.csv"}.get(a, a)
            for a in args]
    argv = bench_args(tmp_path, "--layers", "a", "--sparsities", "0.5", *args)
    if "--threads" in args:
        argv.remove("--threads")
        argv.remove("1")
    if "--shapes-csv" in args:  # the empty file instead of the four tiny layers
        at = argv.index("--shapes-csv")
        del argv[at:at + 2]
        argv.remove("--layers")
        argv.remove("a")
    code, out, err = cli(*argv)
    assert code == 2, out
    one_error_line(err, message)
    assert not (tmp_path / "r.sqlite").exists()  # no run recorded


def test_an_empty_shard_says_so_in_one_line_and_exits_0(tmp_path, cli):
    code, out, err = cli(*bench_args(tmp_path, "--layers", "a", "--shard", "1/2"))
    assert code == 0 and err == ""
    assert out.strip().splitlines() == [
        "bench: shard 1/2 holds none of the 1 layer(s); nothing to measure"]
    assert not (tmp_path / "r.sqlite").exists()


def test_more_threads_than_cores_are_measured_when_forced(tmp_path):
    from harness.cli import build_parser
    from harness.cli.common import threads_of

    many = str(2 * (os.cpu_count() or 1))
    args = build_parser().parse_args(["bench", "--threads", many, "--force-threads"])
    assert threads_of(args) == int(many)


def test_a_layer_merged_into_an_identical_shape_is_measured_as_that_shape(tmp_path):
    from harness.cli import bench, build_parser

    notes = []
    (lay,) = cases.select_layers(["resnet50"], ["layer1.1.conv2"], notes=notes)
    assert lay.name == "layer1.0.conv2" and lay.count == 3
    assert notes == ["resnet50:layer1.1.conv2 has the shape of layer1.0.conv2 (64->64 3x3 p1 "
                     "@56x56); it is measured as layer1.0.conv2"]
    args = build_parser().parse_args(["bench", "--nets", "resnet50", "--layers",
                                      "layer1.1.conv2,layer1.0.conv2", "--kernels",
                                      "cs_cpu_direct", "--sparsities", "0.5", "--quick",
                                      "--threads", "1"])
    todo, _, _, said = bench.plan(args)
    assert {c.layer.name for c in todo} == {"layer1.0.conv2"} and len(said) == 1
    with pytest.raises(ValueError, match="unknown layer"):
        cases.select_layers(["resnet50"], ["layer9.9.conv9"])


# ---- 4. merge changes its output all at once or not at all -----------------------------------
def test_a_failed_merge_leaves_an_existing_output_as_it_was_and_creates_no_new_one(tmp_path,
                                                                                  cli):
    good = rollback_journal(results_db(tmp_path / "good.sqlite"))
    bad = corrupt_page(rollback_journal(results_db(tmp_path / "bad.sqlite", rows=40)))
    out = rollback_journal(results_db(tmp_path / "out.sqlite", layer_name="z"))
    before = digest(out)
    code, _, err = cli("merge", good, bad, "-o", out)
    assert code == 2
    one_error_line(err, r"bad\.sqlite is corrupt")
    assert digest(out) == before
    assert len(Store(out, readonly=True).runs()) == 1  # no orphan runs of good.sqlite
    code, _, err = cli("merge", good, bad, "-o", tmp_path / "new.sqlite")
    assert code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.sqlite", "good.sqlite",
                                                          "out.sqlite"]
    code, out_text, err = cli("merge", good, "-o", tmp_path / "new.sqlite")
    assert code == 0, err
    assert len(Store(tmp_path / "new.sqlite", readonly=True).measurements()) == 2


# ---- 7. no spreadsheet formula in an export ---------------------------------------------------
def test_export_csv_defuses_cells_a_spreadsheet_would_run_as_formulas(tmp_path, cli):
    import pandas as pd

    name = '=HYPERLINK("http://evil.example","click")'
    db = results_db(tmp_path / "r.sqlite", layer_name=name)
    code, _, err = cli("export", "--db", db, "--out", tmp_path / "x.csv")
    assert code == 0, err
    df = pd.read_csv(tmp_path / "x.csv")
    assert set(df.layer) == {"'" + name}  # OWASP: a leading quote makes it text
    for col in df.select_dtypes(include=["object", "string"]).columns:
        assert not df[col].dropna().str.match(r"[=+\-@\t\r]").any(), col
    assert (df.median_s > 0).all()  # numbers stay numbers
    code, _, err = cli("export", "--db", db, "--format", "parquet", "--out", tmp_path / "x.pq")
    assert code == 0 and set(pd.read_parquet(tmp_path / "x.pq").layer) == {name}


def test_a_workers_start_up_is_not_charged_to_the_first_cases_time_limit():
    """A worker started for a case (the first, or a replacement after a timeout) may take
    longer to import than the case's limit on a busy machine: only the case is timed."""
    from procs import slow_serve

    from harness.records import InitReply, InitRequest
    from harness.runner import Worker, WorkerTimeout

    wk = Worker(target=slow_serve)
    try:
        reply = wk.call(InitRequest(()), timeout=2.0)  # answered at once once it is up
        assert isinstance(reply, InitReply), reply
        wk.kill()
        with pytest.raises(WorkerTimeout, match="not ready within 1 s"):
            wk.start(timeout=1.0)
    finally:
        wk.kill()
