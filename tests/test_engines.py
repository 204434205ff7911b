"""Whole-network engines (``harness.engines``): each real engine computes the masked network it
is given, an engine that answers wrongly is recorded and never timed, one that is not installed
is one line, and the headline speedup is against the fastest dense engine of the run."""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from test_harness import ROOT, env
from torch import nn

import harness
from harness import engines
from harness import sparse_model as sm
from harness.records import INTERVAL_COLUMNS, EngineResult, engine_summary
from harness.store import Store
from harness.timing import interleaved_cpu, ratio_interval
from shapes.models import build

PEERS = ["onnxruntime", "openvino", "deepsparse"]


def installed(name):
    """The engine, or a skip where it is not installed. ``nox -s tests`` installs every peer
    this Python can have and says so (SPARSECONV_PEERS): there a missing one fails."""
    e = engines.get(name)
    why = e.available()
    if why:
        wanted = os.environ.get("SPARSECONV_PEERS", "").split(",")
        if name in wanted:
            pytest.fail(f"the tests session installed the peers, yet {why}")
        pytest.skip(why)
    return e


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10)).eval()


@pytest.fixture(scope="module")
def resnet18_masked():
    """ResNet18 at a reduced input, masked as sparsify masks it (CS at 93.75%)."""
    sparse = harness.sparsify(build("resnet18"), "cs", 0.9375, input_size=(3, 64, 64))
    return sm.masked_dense(sparse).eval()


@pytest.mark.parametrize("name", PEERS)
def test_each_engine_computes_the_network_it_is_given(name, resnet18_masked):
    e = installed(name)
    for model, x in ((small_net(), torch.rand(2, 3, 24, 24)),
                     (resnet18_masked, torch.rand(1, 3, 64, 64) * 2 - 1)):
        with torch.no_grad():
            want = copy.deepcopy(model).double()(x.double())
        run = e.prepare(model, x, threads=1)
        assert rel(run(x), want) < 1e-4
        assert e.version() and e.settings(1)
    # the masked network really has its zeros: at least 90% of the conv weights are zero
    w = torch.cat([m.weight.flatten() for m in resnet18_masked.modules()
                   if isinstance(m, nn.Conv2d) and m.in_channels % 32 == 0])
    assert (w == 0).float().mean() > 0.9


@pytest.mark.parametrize("name", ["eager_nchw", "eager_channels_last", *PEERS])
def test_an_engine_given_one_thread_uses_one_core(name):
    """CPU time over wall time within threads + 10%, blocks timed as e2e times them."""
    e = installed(name) if name in PEERS else engines.get(name)
    model, x = build("resnet18"), torch.rand(1, 3, 96, 96)
    torch.set_num_threads(1)
    try:
        run = e.prepare(sm.dense_folded(model, (3, 96, 96))[0], x, threads=1)
        with torch.inference_mode():
            t = interleaved_cpu({name: (run, x)}, rounds=3, min_sample=0.05, gap=0.02)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert t.cpu_per_wall[name] <= 1.1, t.cpu_per_wall


def row(variant, role, s, status="ok"):
    engine, _, network = variant.partition("@")
    return EngineResult(variant=variant, engine=engine, network=network, role=role, label=engine,
                        status=status, interleaved_s=s, latency_s=s)


def test_the_headline_is_against_the_fastest_dense_engine():
    rows = [row("eager_nchw@dense", "dense", 0.060), row("eager_channels_last@dense", "dense", 0.050),
            row("openvino@dense", "dense", 0.040), row("onnxruntime@dense", "dense", 0.001,
                                                       status="incorrect"),
            row("openvino@masked", "control", 0.030), row("deepsparse@masked", "peer", 0.018),
            row("project@sparse", "project", 0.020)]
    s = engine_summary(json.dumps([r.__dict__ for r in rows]))
    # a control on the masked network and an engine that failed its gate are never the baseline
    assert s["best_dense_engine"] == "openvino" and s["best_dense_s"] == 0.040
    assert s["dense_engines"] == "eager_channels_last, eager_nchw, openvino"
    assert s["speedup_best"] == pytest.approx(2.0) and s["speedup_eager"] == pytest.approx(2.5)
    assert s["vs_deepsparse"] == pytest.approx(0.9)
    assert all(s[c] is None for c in INTERVAL_COLUMNS)  # rows with no interval (< 5 rounds)


def test_each_headline_carries_the_interval_of_the_engine_it_is_measured_against():
    def ci(r, lo, hi):
        return dataclasses.replace(r, vs_project_lo=lo, vs_project_hi=hi)

    rows = [ci(row("eager_nchw@dense", "dense", 0.060), 2.8, 3.2),
            ci(row("eager_channels_last@dense", "dense", 0.050), 2.3, 2.7),
            ci(row("openvino@dense", "dense", 0.040), 1.9, 2.1),
            ci(row("deepsparse@masked", "peer", 0.022), 1.0, 1.2),
            ci(row("deepsparse_b@masked", "peer", 0.018), 0.8, 1.0),
            row("project@sparse", "project", 0.020)]
    s = engine_summary(json.dumps([dataclasses.asdict(r) for r in rows]))
    assert (s["speedup_best_lo"], s["speedup_best_hi"]) == (1.9, 2.1)  # openvino's
    assert (s["speedup_eager_lo"], s["speedup_eager_hi"]) == (2.3, 2.7)  # the faster layout's
    assert (s["vs_deepsparse_lo"], s["vs_deepsparse_hi"]) == (0.8, 1.0)  # the faster peer's
    # a ratio reported from an alone figure has no interval: the interleaved one is of another
    rows[2] = rows[2].with_alone(0.030)
    s = engine_summary(json.dumps([dataclasses.asdict(r) for r in rows]))
    assert s["speedup_best"] == pytest.approx(1.5) and s["speedup_best_lo"] is None
    assert s["speedup_eager_lo"] == 2.3  # the others keep theirs
    rows[-1] = rows[-1].with_alone(0.010)  # the project's own figure from its alone run
    s = engine_summary(json.dumps([dataclasses.asdict(r) for r in rows]))
    assert all(s[c] is None for c in INTERVAL_COLUMNS)


def test_an_alone_figure_replaces_the_interleaved_one_only_beyond_ten_percent():
    r = row("openvino@dense", "dense", 0.040)
    assert r.with_alone(0.043).latency_s == 0.040  # 7.5%: the interleaved figure stands
    far = r.with_alone(0.030)
    assert far.latency_s == 0.030 and "-25%" in far.alone_note and far.interleaved_s == 0.040
    assert r.with_alone(None, note="not timed alone: exit 1").latency_s == 0.040


def test_e2e_records_wrong_missing_and_fast_engines(tmp_path):
    """Through the command: a wrong engine is incorrect and untimed (on both networks), a
    missing one is one line and the run goes on, and a stand-in made fast is the baseline."""
    r = subprocess.run([sys.executable, "-m", "harness", "e2e", "--db", str(tmp_path / "e.sqlite"),
                        "--nets", "resnet18", "--patterns", "cs", "--size", "32", "--rounds", "5",
                        "--threads", "1", "--min-sample", "0.002", "--plans", str(tmp_path),
                        "--engines", "standin_wrong,standin_fast,standin_missing"],
                       cwd=ROOT, env=env(HARNESS_PLUGINS="standin_engines"),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "engine standin_missing: not measured: standin_missing is not installed" in r.stdout
    (m,) = Store(tmp_path / "e.sqlite").e2e().itertuples()
    rows = {e["variant"]: e for e in json.loads(m.engines)}
    assert set(rows) == {"eager_nchw@dense", "eager_channels_last@dense", "standin_wrong@dense",
                         "standin_wrong@masked", "standin_fast@dense", "standin_missing@dense",
                         "standin_missing@masked", "project@sparse"}
    for v in ("standin_wrong@dense", "standin_wrong@masked"):
        assert rows[v]["status"] == "incorrect" and rows[v]["rel_err"] > 1e-3
        assert rows[v]["interleaved_s"] is None and rows[v]["latency_s"] is None
    assert rows["standin_missing@masked"]["status"] == "unsupported"
    assert m.best_dense_engine == "standin_fast"
    assert m.speedup_best == pytest.approx(m.best_dense_s / m.sparse_latency_s)
    assert m.speedup_best < m.speedup_eager  # the fast stand-in, not eager, is the baseline
    # each headline's interval is the one its interleaved rounds give, as stored
    # (where both sides report their interleaved figure; a busy machine can make one the alone)
    samples = json.loads(m.samples)
    assert rows["project@sparse"]["vs_project_lo"] is None
    fast = rows["standin_fast@dense"]
    assert (fast["vs_project_lo"], fast["vs_project_hi"]) == pytest.approx(
        ratio_interval(samples["standin_fast@dense"], samples["sparse"]))
    assert fast["vs_project_lo"] <= fast["vs_project_hi"]
    summary = engine_summary(m.engines)
    assert {c: getattr(m, c) for c in INTERVAL_COLUMNS} == {c: summary[c] for c in INTERVAL_COLUMNS}
    if rows["project@sparse"]["alone_note"] is None and fast["alone_note"] is None:
        assert (m.speedup_best_lo, m.speedup_best_hi) == (fast["vs_project_lo"],
                                                          fast["vs_project_hi"])
    # every measured engine, and the project's network, was timed alone in its own process too
    for v in ("eager_nchw@dense", "standin_fast@dense", "project@sparse"):
        assert rows[v]["alone_s"] > 0, rows[v]
    assert "against the best dense engine (standin_fast" in r.stdout


# a stand-in alone child: ready at once, each block 30 ms of sleep, its start and end logged
STANDIN_CHILD = """
import json, sys, time
name, log = sys.argv[1], sys.argv[2]
print("an engine's banner", flush=True)
print(json.dumps({"ready": 1}), flush=True)
for line in sys.stdin:
    t0 = time.monotonic(); time.sleep(0.03); t1 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"{name} {t0} {t1}\\n")
    print(json.dumps({"s": t1 - t0, "cpu_per_wall": 0.0}), flush=True)
"""


def test_alone_processes_are_timed_in_interleaved_rounds_one_block_at_a_time(tmp_path):
    """The alone figures share the machine's moments: every child is prepared first, then each
    round gives each ready child one block in turn, never two at once; a child that fails,
    dies mid-way or never answers is left out with its reason and the others still finish."""
    from harness.engines import alone

    log = tmp_path / "blocks.log"
    child = [sys.executable, "-c", STANDIN_CHILD]
    got = alone.timed_apart({
        "a": [*child, "a", str(log)],
        "fails": [sys.executable, "-c", "import sys; sys.exit('cannot build the engine')"],
        "b": [*child, "b", str(log)],
        "dies": [sys.executable, "-c", "import json, sys; print(json.dumps({'ready': 1}), "
                 "flush=True); sys.stdin.readline(); sys.exit(4)"],
        "silent": [sys.executable, "-c", "import time; time.sleep(60)"],
    }, rounds=3, gap=0.0, timeout=5)
    assert list(got) == ["a", "fails", "b", "dies", "silent"]
    for name in ("a", "b"):
        median, cpu, why, group = got[name]
        assert why is None and 0.03 <= median < 0.5 and cpu == 0.0 and group == 1
    assert got["fails"] == (None, None, "not timed alone: exit 1: cannot build the engine", 1)
    assert got["dies"] == (None, None, "not timed alone: exit 4: no output", 1)
    assert got["silent"] == (None, None, "not timed alone: no answer within 5 s", 1)
    blocks = sorted((float(t0), float(t1), n) for n, t0, t1 in
                    (line.split() for line in log.read_text().splitlines()))
    assert [n for _, _, n in blocks] == ["a", "b"] * 3  # interleaved, in rounds
    assert all(blocks[i][1] <= blocks[i + 1][0] for i in range(len(blocks) - 1))  # one at a time


def test_the_alone_child_answers_ready_then_one_block_per_go(tmp_path):
    """The real child (``python -m harness.engines.alone SPEC``) on a small eager network: one
    ready line, then one timed block per ``go``, the block's seconds per call and CPU/wall."""
    from harness.engines import alone
    from harness.records import TimingOptions

    torch.save(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval(), tmp_path / "m.pt")
    torch.save(torch.randn(1, 3, 16, 16), tmp_path / "x.pt")
    spec = {"variant": "eager_nchw@dense", "x": str(tmp_path / "x.pt"), "threads": 1,
            "model": str(tmp_path / "m.pt"),
            "opts": dataclasses.asdict(TimingOptions(rounds=2, min_sample=0.002, warmup=0.0))}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    got = alone.timed_apart(
        {"eager": [sys.executable, "-m", "harness.engines.alone", str(tmp_path / "spec.json")]},
        rounds=2)
    median, cpu, why, _ = got["eager"]
    assert why is None and 0 < median < 0.05 and 0.3 < cpu < 1.5


def test_where_one_engine_reports_its_alone_figure_every_engine_does():
    """A headline ratio never sets an alone figure over an interleaved one: they come from
    different stretches of a machine that runs faster and slower by turns. Where the alone
    figures do not share their moments either (an engine not timed alone, or the alone
    processes run in groups), every engine reports its interleaved one."""
    from harness.records import one_source

    def row(v, inter, alone):
        return EngineResult(variant=v, engine=v.split("@")[0], network=v.split("@")[1],
                            role="dense", label=v, status="ok", interleaved_s=inter,
                            latency_s=inter).with_alone(alone)

    close = {"a@dense": row("a@dense", 0.040, 0.041), "b@dense": row("b@dense", 0.020, 0.021)}
    assert one_source(close) == close  # every alone figure within 10%: interleaved throughout
    rows = {**close, "c@dense": row("c@dense", 0.030, 0.020)}
    got = one_source(rows)
    assert got["c@dense"] == rows["c@dense"] and got["c@dense"].latency_s == 0.020
    assert got["a@dense"].latency_s == 0.041 and got["b@dense"].latency_s == 0.021
    assert "as for every engine of the run: c@dense differs" in got["a@dense"].alone_note
    summary = engine_summary(json.dumps([dataclasses.asdict(r) for r in got.values()]))
    assert summary["best_dense_engine"] == "c" and summary["best_dense_s"] == 0.020
    # d's alone process failed: no alone figure set shares its moments, interleaved for all
    failed = one_source({**rows, "d@dense": row("d@dense", 0.050, None)})
    assert {k: r.latency_s for k, r in failed.items()} == {
        "a@dense": 0.040, "b@dense": 0.020, "c@dense": 0.030, "d@dense": 0.050}
    assert "interleaved reported" in failed["c@dense"].alone_note
    assert "not timed alone: d@dense" in failed["c@dense"].alone_note
    grouped = one_source(rows, groups=2)
    assert grouped["c@dense"].latency_s == 0.030 and "2 groups" in grouped["c@dense"].alone_note
    assert grouped["a@dense"] == rows["a@dense"]


def test_alone_processes_that_do_not_fit_in_memory_wait_for_a_later_group(tmp_path):
    """Where memory would not hold one more alone process, the ready ones are timed in their
    rounds and ended first; the rest form the next group (a VGG19 run with every alone process
    alive at once had the kernel kill the run's worker)."""
    from harness.engines import alone

    log = tmp_path / "blocks.log"
    child = [sys.executable, "-c", STANDIN_CHILD]
    seen = []

    def room(pids):  # two processes at a time
        seen.append(len(pids))
        return len(pids) < 2

    got = alone.timed_apart({n: [*child, n, str(log)] for n in "abc"}, rounds=2, gap=0.0,
                            room=room)
    assert all(got[n][2] is None and got[n][0] >= 0.03 for n in "abc")
    assert [got[n][3] for n in "abc"] == [1, 1, 2]
    blocks = sorted((float(t0), n) for n, t0, _ in
                    (line.split() for line in log.read_text().splitlines()))
    assert [n for _, n in blocks] == ["a", "b", "a", "b", "c", "c"]
    assert seen == [1, 2]  # asked before each start after the first of a group


def test_memory_room_keeps_twice_the_largest_process_and_a_tenth_of_the_machine(monkeypatch):
    import collections

    import psutil

    from harness.engines import alone

    me = psutil.Process().memory_info().rss
    vm = collections.namedtuple("vm", "available total")
    slack = 10**8  # this process may grow a little between the two reads
    for available, total, fits in [(2 * me + 10**9 + slack, 10**10, True),  # 2x me, 10% left
                                   (2 * me + 10**9 - slack, 10**10, False),
                                   (10**9, 10**10, True)]:  # no process asked about: only 10%
        monkeypatch.setattr(psutil, "virtual_memory", lambda a=available, t=total: vm(a, t))
        pids = [os.getpid()] if available != 10**9 else []
        assert alone.memory_room(pids) is fits


def test_the_exported_onnx_files_are_removed_at_the_end_of_each_e2e_case(tmp_path, monkeypatch):
    """The worker ends with os._exit, which runs no exit handler: the export folder (2.4 GB
    for VGG19) was left in the temporary folder by every e2e run."""
    from harness.e2e import run_e2e
    from harness.engines import _onnx

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    path = _onnx.export(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), torch.randn(1, 3, 8, 8))
    assert os.path.exists(path)
    with pytest.raises(AttributeError):
        run_e2e(object())  # not a request: the case fails at once
    assert not os.path.exists(path) and list(tmp_path.iterdir()) == []
    again = _onnx.export(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), torch.randn(1, 3, 8, 8))
    assert os.path.exists(again)  # a later case exports afresh
    _onnx.cleanup()
