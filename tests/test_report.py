"""The HTML report: built from a real (small) sweep, opened in headless Chromium."""

import os
import shutil
import subprocess
import sys

import pytest
from test_harness import ROOT, bench, env

SECTIONS = ["machine", "per-layer", "network", "sensitivity", "roofline", "autotune", "paper",
            "gpu", "failures", "results"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    r = bench(tmp, "--kernels", "cs_cpu_direct,bsr_1xn_cpu,cci_cpu", "--sparsities",
              "0.75,0.9375")
    assert r.returncode == 0, r.stderr
    out = tmp / "index.html"
    r = subprocess.run([sys.executable, "-m", "harness", "report", "--db", str(tmp / "r.sqlite"),
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


@pytest.mark.skipif(os.environ.get("SPARSECONV_NO_BROWSER") == "1",
                    reason="SPARSECONV_NO_BROWSER=1: browser check deliberately turned off")
def test_report_in_headless_chromium(report):
    assert CHROMIUM, "Debian's chromium is needed for this test: apt-get install chromium " \
                     "(.ci/run installs it), or set SPARSECONV_NO_BROWSER=1 to opt out"
    from playwright.sync_api import sync_playwright

    shot = ROOT / "reports" / "test-screenshot.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        widths = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth)")
        ids = page.evaluate("Array.from(document.querySelectorAll('section[id]')).map(s => s.id)")
        net_rows = page.evaluate("document.querySelectorAll('#network table tr').length")
        page.screenshot(path=str(shot), full_page=False)
        browser.close()
    assert errors == []
    assert len(widths) >= 5 and all(w and w > 0 for w in widths)
    assert set(SECTIONS) <= set(ids)
    assert net_rows > 1
    assert shot.stat().st_size > 10_000


def test_missing_or_empty_database_gives_a_clear_message(tmp_path):
    for db in (tmp_path / "none.sqlite", tmp_path / "empty.sqlite"):
        if db.name == "empty.sqlite":
            from harness.store import Store
            Store(db).close()
        r = subprocess.run([sys.executable, "-m", "harness", "report", "--db", str(db), "--out",
                            str(tmp_path / "x.html")], cwd=ROOT, env=env(), capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2
        assert "Traceback" not in r.stderr
        assert "run `" in r.stderr and len(r.stderr.strip().splitlines()) == 1
