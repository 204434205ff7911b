"""The HTML report: built from a real (small) sweep, opened in headless Chromium."""

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from test_harness import ROOT, bench, env, rows

import kernels
from harness import analysis
from harness.store import Store
from kernels import _ext

SECTIONS = ["answer", "e2e", "machine", "per-layer", "network", "sensitivity", "roofline", "autotune", "paper",
            "gpu", "failures", "results"]
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                 "google-chrome"))), None)
GPU_KERNELS = [n for n in kernels.names(device="cuda") if not n.startswith("faulty")]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """A real CPU sweep, then the GPU pipeline through Triton's interpreter (with a wrong
    Triton plugin) into the same database."""
    tmp = tmp_path_factory.mktemp("report")
    # confirmed, with at least 5 rounds: the charts draw the race's intervals as error bars
    r = bench(tmp, "--kernels", "cs_cpu_direct,bsr_1xn_cpu,cci_cpu", "--sparsities",
              "0.75,0.9375", "--layers", "a,b", "--confirm", "--rounds", "5")
    assert r.returncode == 0, r.stderr
    # one interpreter round per case: the interpreter's times are never read as timings
    r = bench(tmp, "--device", "cuda", "--interpret", "--quick", "--layers", "b,d",
              "--sparsities", "0.5", "--rounds", "1", plugins="faulty_kernels,faulty_triton")
    assert r.returncode == 0, r.stderr
    assert "not GPU timings" in r.stdout
    r = subprocess.run([sys.executable, "-m", "harness", "e2e", "--db", str(tmp / "r.sqlite"),
                        "--nets", "resnet18", "--patterns", "cs,1xn", "--size", "32",
                        "--rounds", "2", "--min-sample", "0.0002", "--plans",
                        str(tmp / "no-plans"), "--engines", "none", "--no-alone"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return tmp / "r.sqlite"


def test_interpreter_run_checks_every_gpu_kernel_and_catches_the_wrong_one(db):
    df = rows(db)
    gpu = df[df.device == "cuda-interpret"]
    assert set(GPU_KERNELS) <= set(gpu.kernel)
    for name in GPU_KERNELS:
        k = gpu[gpu.kernel == name]
        assert (k.status == "ok").all() and len(k) >= 2, k[["status", "reason"]]
        assert (k.rel_err < 1e-5).all() and (k.median_s > 0).all()
    wrong = gpu[gpu.kernel == "faulty_triton_wrong"]
    assert len(wrong) == 2 and (wrong.status == "incorrect").all()
    assert wrong.median_s.isna().all()
    # sparse interpreter rows were timed against the interpreter run's own dense baseline
    sparse = gpu[(gpu.pattern != "dense") & (gpu.status == "ok")]
    assert sparse.dense_median_s.notna().all()


def test_the_cpu_sweep_is_confirmed_and_its_bests_carry_the_race_intervals(db):
    df = Store(db, create=False).measurements()
    cpu = df[df.device == "cpu"]
    best = analysis.best_per_layer(cpu)
    # layers a, b x three patterns x two sparsities, less any slot whose every row a busy
    # machine flagged (those feed no best figure)
    ok = cpu[(cpu.pattern != "dense") & (cpu.status == "ok") & ~analysis.flagged(cpu)]
    slots = ok.groupby(["layer", "pattern", "sparsity"]).ngroups
    assert len(best) == slots and slots > 2 * 3 * 2 // 2
    assert best.confirmed.all()  # every best was raced again, and its figure is the race's
    assert (best.speedup == best.conf_speedup).all()
    assert (best.speedup_lo.notna() & (best.speedup_lo <= best.speedup_hi)).all()


def test_a_flagged_network_timing_is_never_the_answer(db, tmp_path):
    from harness import report as report_mod

    copy = tmp_path / "copy.sqlite"
    shutil.copy(db, copy)
    store = Store(copy)
    e2e = store.e2e()
    first = report_mod._e2e(e2e, pd.DataFrame())["answer"]
    assert [a["pattern"] for a in first] and first[0]["source"].startswith("e2e")
    won = first[0]["pattern"]
    store.db.execute("UPDATE e2e SET implausible = 'planted' WHERE pattern = ?", (won,))
    store.db.commit()
    then = report_mod._e2e(store.e2e(), pd.DataFrame())["answer"]
    assert won not in [a["pattern"] for a in then]
    assert all(a["pattern"] != won for a in then)


def test_a_database_from_before_a_new_e2e_column_still_reports(db, tmp_path):
    """The report opens a database read-only, so one written before an e2e column was added
    keeps lacking it: the rows come back with the column empty, and the report is written."""
    import sqlite3

    old = tmp_path / "old.sqlite"
    shutil.copy(db, old)
    with sqlite3.connect(old) as con:
        for col in ("batch_chunk", "sparse_whole_s"):
            con.execute(f"ALTER TABLE e2e DROP COLUMN {col}")
    e2e = Store(old, readonly=True).e2e()
    assert len(e2e) and e2e.batch_chunk.isna().all() and e2e.sparse_whole_s.isna().all()
    r = subprocess.run([sys.executable, "-m", "harness", "report", "--db", str(old), "--out",
                        str(tmp_path / "old.html")], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "images per call" in (tmp_path / "old.html").read_text()


@pytest.fixture(scope="module")
def report(db):
    tmp = db.parent
    out = tmp / "index.html"
    r = subprocess.run([sys.executable, "-m", "harness", "report", "--db", str(db),
                        "--out", str(out)], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    return out


def test_report_is_self_contained(report):
    html = report.read_text()
    assert "<img" in html and 'src="http' not in html and "<script src" not in html
    assert html.count("data:image/png;base64,") >= 5
    assert "layer mapping" in html.lower() or "mapping used here is an assumption" in html
    assert "holds no GPU measurements" in html
    assert "Interpreter pipeline check (not GPU timings)" in html
    net = html[html.index('id="network"'):html.index('id="sensitivity"')]
    assert "cuda-interpret" not in net and "triton" not in net  # never a speedup


def chromium_launch(p):
    """Debian's Chromium where installed, else playwright's own browser."""
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    if CHROMIUM:
        return p.chromium.launch(executable_path=CHROMIUM, args=args)
    return p.chromium.launch(args=args)


@pytest.mark.skipif(os.environ.get("SPARSECONV_NO_BROWSER") == "1",
                    reason="SPARSECONV_NO_BROWSER=1: browser check deliberately turned off")
def test_report_in_headless_chromium(report):
    from playwright.sync_api import Error, sync_playwright

    shot = ROOT / "reports" / "test-screenshot.png"
    with sync_playwright() as p:
        try:
            browser = chromium_launch(p)
        except Error as e:
            pytest.fail(f"no browser for the report test ({str(e).splitlines()[0]}): `nox -s "
                        f"tests` installs one (Debian's chromium, or playwright's download); "
                        f"SPARSECONV_NO_BROWSER=1 skips this test deliberately")
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        widths = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth)")
        ids = page.evaluate("Array.from(document.querySelectorAll('section[id]')).map(s => s.id)")
        net_rows = page.evaluate("document.querySelectorAll('#network table tr').length")
        interp = page.evaluate("""() => {
            const t = document.querySelector('#interpreter-table');
            const h = document.querySelector('#gpu-interpreter');
            return {rows: t ? t.querySelectorAll('tr').length : 0,
                    title: h ? h.innerText : '', visible: !!(t && t.offsetParent),
                    bad: t ? t.querySelectorAll('tr.bad').length : 0};
        }""")
        e2e = page.evaluate("""() => ({
            answer: document.querySelectorAll('#answer-table tr').length,
            rows: document.querySelectorAll('#e2e-table tr').length,
            handover: [...document.querySelectorAll('#e2e-table tr')].slice(1).map(tr => {
                const h = [...document.querySelectorAll('#e2e-table th')].map(t => t.innerText);
                const i = h.indexOf('handover pairs');
                return [tr.cells[i].innerText, tr.cells[i + 1].innerText,
                        tr.cells[i].getAttribute('title')]; }),
            efficiency: [...document.querySelectorAll('#efficiency-table tr')].slice(1).map(
                tr => [tr.cells[1].innerText, parseFloat(tr.cells[4].innerText)]),
            first: document.querySelector('main section').id})""")
        page.screenshot(path=str(ROOT / "reports" / "test-screenshot-e2e.png"))
        page.locator("#gpu-interpreter").scroll_into_view_if_needed()
        page.screenshot(path=str(ROOT / "reports" / "test-screenshot-interpreter.png"))
        page.screenshot(path=str(shot), full_page=False)
        browser.close()
    assert errors == []
    assert len(widths) >= 5 and all(w and w > 0 for w in widths)
    assert set(SECTIONS) <= set(ids)
    assert net_rows > 1
    assert interp["visible"] and "not GPU timings" in interp["title"]
    assert interp["rows"] >= 1 + 2 * (len(GPU_KERNELS) + 1)  # every case of both layers
    assert interp["bad"] == 2  # the wrong Triton plugin, on both layers, highlighted
    assert e2e["first"] == "answer"  # the page opens with the answer
    # header, the CPU sweep's net at its two sparsities (summed), resnet18 (measured)
    assert e2e["answer"] == 1 + 2 + 1
    assert e2e["rows"] == 1 + 2  # header, resnet18 with cs and with 1xn
    eff = dict(e2e["efficiency"])  # per kernel, % of the run's GEMM peak: finite, positive
    assert {"dense_cpu", "cs_cpu_direct"} <= set(eff) and all(0 < v < 1000 for v in eff.values())
    # 8 pairs, named, with the time they save; none for CS where it runs channels-last
    assert sorted(p for p, _, _ in e2e["handover"]) == (["0", "8"] if _ext.avx512() else ["8", "8"])
    for pairs, saved, names in e2e["handover"]:
        if pairs == "8":
            assert "layer1.0.conv1 -> layer1.0.conv2" in names
            float(saved)
    assert shot.stat().st_size > 10_000


def test_missing_or_empty_database_gives_a_clear_message(tmp_path, cli):
    for db in (tmp_path / "none.sqlite", tmp_path / "empty.sqlite"):
        if db.name == "empty.sqlite":
            from harness.store import Store
            Store(db).close()
        code, _, err = cli("report", "--db", db, "--out", tmp_path / "x.html")
        assert code == 2
        assert "Traceback" not in err
        assert "run `" in err and len(err.strip().splitlines()) == 1
