"""Numbers that hold on a busy machine: rounds taken while other work ran are retaken (a bounded
number of times) or flagged, a ratio above the FLOP ideal is re-measured and flagged when it
stays, intervals cover the true ratio, and flagged rows feed no best figure. None of these
tests reads the machine's real timing: readings are recorded, delays far above any noise."""

import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_harness import ROOT, env

import kernels
from harness import analysis, contention, measure
from harness.cases import make_case
from harness.records import CaseRequest, DenseRef, Status, TimingOptions
from harness.store import Store
from harness.timing import ratio_interval
from kernels.registry import _REGISTRY
from shapes import ConvLayer


class Recorded:
    """A stand-in for /proc: each reading advances the clock by one second; the machine's busy
    CPU by ``own + others[i]`` seconds for round i, this process's by ``own``, our threads'
    run-queue wait by ``waits[i]`` (default: as much as other work ran, as at an equal
    priority; None: not readable)."""

    def __init__(self, others, own=1.0, waits=None):
        self.others, self.own = list(others), own
        self.waits = list(waits) if waits is not None else self.others
        self.t = self.busy = self.mine = self.waited = 0.0
        self.calls = 0

    def clock(self):
        return self.t

    def machine_busy(self):
        return self.busy

    def own_cpu(self):
        return self.mine

    def runq_wait(self):
        return None if self.waited is None else self.waited

    def steal(self):
        return 0.0

    def advance(self):  # one round: what the machine did meanwhile
        other = self.others[min(self.calls, len(self.others) - 1)]
        wait = self.waits[min(self.calls, len(self.waits) - 1)]
        self.waited = None if wait is None else (self.waited or 0.0) + wait
        self.calls += 1
        self.t += 1.0
        self.mine += self.own
        self.busy += self.own + other


def run_rounds(others, n, waits=None, **kw):
    rec = Recorded(others, waits=waits)
    mon = contention.Monitor(reader=rec, clock=rec.clock)
    kept, dropped, slept = [], [], []

    def take_round():
        rec.advance()
        kept.append(rec.calls)

        def drop():
            dropped.append(kept.pop())
        return drop

    kw.setdefault("budget", contention.Budget(allowance=1e9))
    seen = contention.rounds(take_round, n, monitor=mon, sleep=slept.append, **kw)
    return seen, kept, dropped, slept


def test_a_round_taken_while_other_work_ran_is_retaken():
    # round 1 saw other work hold a whole core, its retake 0.1: it is kept
    seen, kept, dropped, slept = run_rounds([1.0, 0.1, 0.0, 0.0], 3, max_share=0.25)
    assert dropped == [1] and kept == [2, 3, 4]
    assert seen.retaken == 1 and not seen.contended and seen.share == pytest.approx(0.1)
    assert slept == [contention.BACKOFF]


def test_a_round_that_stays_contended_is_kept_flagged_and_retaken_at_most_the_bound():
    seen, kept, dropped, slept = run_rounds([0.8], 2, max_share=0.25, retakes=3)
    assert seen.contended and seen.share == pytest.approx(0.8)
    assert seen.retaken == 6 and len(kept) == 2  # 3 retakes per round, then kept
    assert slept[:3] == [contention.BACKOFF * 2 ** i for i in range(3)]


def test_a_machine_that_stays_busy_spends_at_most_the_retake_budget():
    """Persistent load: retakes stop once their time (windows and back-offs) passes the
    budget's share of the time kept, and every later contended window is kept and flagged."""
    budget = contention.Budget(share=0.5, allowance=0.0)
    budget.kept = 4.0  # four one-second windows kept earlier in the process
    seen, kept, dropped, slept = run_rounds([0.8], 10, max_share=0.25, budget=budget)
    assert seen.contended and len(kept) == 10
    assert budget.kept == pytest.approx(14.0)
    # without the budget: 3 retakes per window, 30 in all; with it, each retake is taken only
    # while the time spent retaking is below half the time kept, so it overshoots by one
    # retake (one window and its longest back-off) at most
    assert 0 < seen.retaken < 10
    assert budget.retaken == pytest.approx(seen.retaken + sum(slept))
    assert budget.retaken <= 0.5 * budget.kept + 1 + 4 * contention.BACKOFF


def test_other_work_that_never_kept_our_threads_waiting_is_not_contention():
    """At a raised priority other work runs only on cores our threads leave idle: it holds a
    share of a core, our threads never wait for one, and the round stands, its share kept."""
    seen, kept, dropped, _ = run_rounds([0.8], 3, waits=[0.01], max_share=0.25)
    assert not seen.contended and seen.retaken == 0 and not dropped
    assert seen.share == pytest.approx(0.8) and seen.runq == pytest.approx(0.01)
    # the same share while our threads waited a fifth of the time is contention
    seen, *_ = run_rounds([0.8], 3, waits=[0.2], max_share=0.25)
    assert seen.contended and seen.retaken > 0
    # where the wait cannot be read, the share alone decides
    seen, *_ = run_rounds([0.8], 3, waits=[None], max_share=0.25)
    assert seen.contended and seen.retaken > 0


def test_an_idle_machine_retakes_nothing():
    seen, kept, dropped, _ = run_rounds([0.0, 0.2, 0.1], 3, max_share=0.25)
    assert seen.retaken == 0 and not seen.contended and not dropped


def test_the_proc_reader_counts_this_process_in_the_machine_and_as_its_own():
    """A busy loop of ours shows in our own CPU time and in the machine's, so it is subtracted
    from what other work used (whatever else the machine does meanwhile)."""
    r = contention.ProcReader()
    busy0, own0 = r.machine_busy(), r.own_cpu()
    t = time.perf_counter()
    while time.perf_counter() - t < 0.5:
        pass
    own = r.own_cpu() - own0
    assert own > 0.2  # our loop ran most of the time
    assert r.machine_busy() - busy0 >= 0.8 * own  # the machine's busy time includes ours


@pytest.mark.parametrize("n", [5, 7, 15])
def test_the_bootstrap_interval_covers_a_known_ratio_90_to_98_percent(n):
    rng = np.random.default_rng(n)
    truth, hits = 3.0, 0
    for _ in range(500):
        drift = rng.lognormal(0, 0.05, n)  # both sides of a round see the same drift
        sparse = 1e-3 * drift * rng.lognormal(0, 0.08, n)
        dense = truth * 1e-3 * drift * rng.lognormal(0, 0.08, n)
        lo, hi = ratio_interval(dense, sparse, seed=int(rng.integers(1 << 30)), n_boot=600)
        hits += lo <= truth <= hi
    assert 0.90 * 500 <= hits <= 0.98 * 500, hits


def test_one_slow_round_of_five_does_not_make_a_7x_difference_a_tie():
    """Four rounds 7x apart and one in which other work slowed the faster side to par: the
    interval stays below 1 and bounded (bootstrap-t put its upper end at 3e40)."""
    lucky = [1.0e-3, 1.01e-3, 0.99e-3, 1.0e-3, 7.0e-3]
    steady = [7.0e-3, 7.02e-3, 6.99e-3, 7.01e-3, 7.0e-3]
    lo, hi = ratio_interval(lucky, steady)
    assert lo < 1 / 7 < hi < 1, (lo, hi)
    lo, hi = ratio_interval(steady, lucky)  # the same pair the other way round
    assert 1 < lo < 7 < hi < 10, (lo, hi)


def test_equal_ratios_give_a_point_interval():
    assert ratio_interval([2.0] * 6, [1.0] * 6) == pytest.approx((2.0, 2.0))


def test_no_interval_from_fewer_than_five_rounds():
    assert ratio_interval([2.0] * 4, [1.0] * 4) == (None, None)


LAYER = ConvLayer(net="t", name="t", index=0, cin=32, cout=32, kh=3, kw=3, stride=1, padding=1, h=12,
                  w=12)


class _Plain(kernels.Kernel):
    """The masked weight through torch's own convolution: no faster than dense."""

    pattern, device, space = "unstructured", "cpu", {"variant": (0,)}
    name = "test_plain_masked"

    def _prepare(self, layer, weight, sparsity, config):
        wm = self.make_pattern(sparsity, config).apply(weight)

        def call(x, out=None):
            y = F.conv2d(x, wm, padding=layer.padding)
            return y if out is None else out.copy_(y)

        return kernels.Run(wm, call)


class _Sleepy(kernels.Kernel):
    """A dense convolution that sleeps 20 ms on every other call."""

    pattern, device, baseline = "dense", "cpu", True
    space = {"layout": ("nchw",)}
    name = "test_sleepy_dense"

    def _prepare(self, layer, weight, sparsity, config):
        calls = [0]

        def call(x, out=None):
            calls[0] += 1
            if calls[0] % 2:
                time.sleep(0.02)
            y = F.conv2d(x, weight, padding=layer.padding)
            return y if out is None else out.copy_(y)

        return kernels.Run(weight, call, layout=lambda x: x, resident=call)


@pytest.fixture
def test_kernels():
    for k in (_Plain(), _Sleepy()):
        _REGISTRY[k.name] = k
    yield
    for name in ("test_plain_masked", "test_sleepy_dense"):
        _REGISTRY.pop(name, None)


def execute(dense_kernel):
    case = make_case(LAYER, kernels.get("test_plain_masked"), 0.5, {"variant": 0}, 1, "float32",
                     "cpu", 1)
    opts = TimingOptions(rounds=5, min_sample=1e-3, warmup=0.0, max_contention=None)
    torch.manual_seed(0)
    return measure.execute(CaseRequest(case, opts, DenseRef(dense_kernel, "nchw", "nchw")))


def test_a_dense_run_slowed_by_sleeps_is_re_measured_and_flagged_implausible(test_kernels):
    r = execute("test_sleepy_dense")
    assert r.status is Status.OK and r.remeasured == 1
    assert r.implausible and "above the FLOP ideal 2.00x" in r.implausible
    assert r.dense_median_s / r.median_s > 2.1


def test_a_plausible_ratio_is_neither_re_measured_nor_flagged(test_kernels):
    """The masked weight through torch's own convolution, no faster than dense: never flagged,
    and not measured twice. Its calls are tens of microseconds and the suite runs two workers on
    two cores, so a round the other worker disturbs can push one run's ratio past the check,
    which then rightly measures again (seen once in a fresh clone: interval 0.91-4.53x): the
    claim is held on the first of up to three runs that nothing disturbed."""
    for _ in range(3):
        r = execute("dense_cpu")
        assert r.status is Status.OK and r.implausible is None, r.implausible
        if r.remeasured == 0:
            break
    assert r.remeasured == 0
    assert r.speedup_lo is not None and r.speedup_lo <= r.speedup_hi


def test_a_flagged_lucky_row_never_reaches_a_best_figure():
    base = dict(fp_hash="f", machine_hash="m", net="resnet50", layer="l1", batch=1,
                dtype="float32", device="cpu", threads=2, pattern="cs", sparsity=0.9375,
                status="ok", dense_median_s=1e-3, dense_kernel_median_s=1e-3, flops=1e9,
                contended=0, implausible=None)
    rows = pd.DataFrame([
        {**base, "kernel": "k", "config": "a", "median_s": 1e-3 / 6, "kernel_median_s": 1e-3 / 6},
        {**base, "kernel": "k", "config": "lucky", "median_s": 1e-3 / 30,
         "kernel_median_s": 1e-3 / 30, "implausible": "30x above the FLOP ideal"},
        {**base, "kernel": "k", "config": "busy", "median_s": 1e-3 / 12,
         "kernel_median_s": 1e-3 / 12, "contended": 1}])
    best = analysis.best_per_layer(rows)
    assert list(best.config) == ["a"] and best.best_kernel_speedup.iloc[0] == pytest.approx(6)


# ---- the confirmation pass ------------------------------------------------------------------
def test_a_lucky_row_slower_when_raced_again_never_reaches_a_best_figure(tmp_path):
    """``test_lucky`` is the layer's best in the sweep and 40 ms slower per call in the
    confirmation race; ``test_steady`` (4 ms slower than dense, always) overtakes it there, and
    every best figure (the per-layer best and the network table the report's answer sums) is
    the race's figure for ``test_steady``."""
    shapes = tmp_path / "one.csv"
    # 9 rounds: the race's win needs its interval clear of 1 whatever one loaded round does
    # big enough (~1 ms dense) that its dense runs are not at the mercy of scheduling noise
    shapes.write_text("name,cin,cout,kh,kw,stride,padding,h,w\na,64,64,3,3,1,1,28,28\n")
    db = tmp_path / "r.sqlite"
    r = subprocess.run(
        [sys.executable, "-m", "harness", "bench", "--shapes-csv", str(shapes), "--nets", "",
         "--db", str(db), "--rounds", "9", "--min-sample", "0.0002", "--threads", "1",
         "--no-progress", "--kernels", "test_lucky,test_steady", "--sparsities", "0.5"],
        cwd=ROOT, env=env(HARNESS_PLUGINS="lucky_kernels", LUCKY_STATE=str(tmp_path / "lucky")),
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    df = analysis.with_speedups(Store(db, create=False).measurements()).set_index("kernel")
    lucky, steady = df.loc["test_lucky"], df.loc["test_steady"]
    assert not analysis.flagged(df.loc[["test_lucky", "test_steady"]]).any(), df.implausible
    assert "1 overtaken by the runner-up" in r.stdout, (r.stdout, df[["speedup", "conf_speedup"]])
    assert lucky.speedup > 2 * steady.speedup  # the sweep's best, by far
    assert lucky.conf_rank == 1 and steady.conf_rank == 2
    assert lucky.conf_speedup < steady.conf_speedup / 3  # raced again: far slower
    assert steady.conf_vs_other_lo > 1  # and the interval says so
    best = analysis.best_per_layer(Store(db, create=False).measurements())
    assert list(best.kernel) == ["test_steady"] and bool(best.confirmed.iloc[0])
    assert best.speedup.iloc[0] == pytest.approx(steady.conf_speedup)
    assert best.tied_with.iloc[0] is None
    net = analysis.network_table(Store(db, create=False).measurements())
    assert net.speedup.iloc[0] == pytest.approx(steady.conf_speedup)


def test_overlapping_race_intervals_are_a_tie_not_a_ranking():
    base = dict(fp_hash="f", machine_hash="m", net="n", layer="l1", batch=1, dtype="float32",
                device="cpu", threads=2, pattern="cs", sparsity=0.75, status="ok",
                dense_median_s=1e-3, dense_kernel_median_s=1e-3, flops=1e9, contended=0,
                implausible=None, conf_reason=None, conf_contended=0, conf_implausible=None,
                conf_kernel_speedup=None)
    rows = pd.DataFrame([
        {**base, "kernel": "a", "config": "{}", "median_s": 1e-3 / 3.3,
         "kernel_median_s": 1e-3 / 3, "conf_rank": 1, "conf_speedup": 3.0,
         "conf_vs_other": 1.02, "conf_vs_other_lo": 0.97, "conf_vs_other_hi": 1.08},
        {**base, "kernel": "b", "config": "{}", "median_s": 1e-3 / 3.1,
         "kernel_median_s": 1e-3 / 3, "conf_rank": 2, "conf_speedup": 2.94,
         "conf_vs_other": 0.98, "conf_vs_other_lo": 0.93, "conf_vs_other_hi": 1.03},
        {**base, "layer": "l2", "kernel": "a", "config": "{}", "median_s": 1e-3 / 3.3,
         "kernel_median_s": 1e-3 / 3, "conf_rank": 1, "conf_speedup": 3.2,
         "conf_vs_other": 1.3, "conf_vs_other_lo": 1.2, "conf_vs_other_hi": 1.4},
        {**base, "layer": "l2", "kernel": "b", "config": "{}", "median_s": 1e-3 / 2.5,
         "kernel_median_s": 1e-3 / 3, "conf_rank": 2, "conf_speedup": 2.4,
         "conf_vs_other": 0.77, "conf_vs_other_lo": 0.71, "conf_vs_other_hi": 0.83},
        # raced, but contended in the race: its sweep figure (6x) counts for nothing
        {**base, "layer": "l3", "kernel": "a", "config": "{}", "median_s": 1e-3 / 6,
         "kernel_median_s": 1e-3 / 6, "conf_rank": 1, "conf_speedup": 3.9,
         "conf_contended": 1},
        # never raced: its sweep figure, marked unconfirmed
        {**base, "layer": "l4", "kernel": "a", "config": "{}", "median_s": 1e-3 / 2,
         "kernel_median_s": 1e-3 / 2}])
    best = analysis.best_per_layer(rows).set_index("layer")
    assert best.loc["l1", "kernel"] == "a" and best.loc["l1", "tied_with"] == "b {}"
    assert best.loc["l1", "speedup"] == pytest.approx(3.0)  # the race's, not the sweep's 3.3
    assert best.loc["l2", "tied_with"] is None and best.loc["l2", "speedup"] == pytest.approx(3.2)
    assert "l3" not in best.index
    assert not best.loc["l4", "confirmed"] and best.loc["l4", "speedup"] == pytest.approx(2.0)


# ---- the cause found on an idle machine: the allocator ---------------------------------------
FAULTS = """
import resource, sys
import torch
import kernels, shapes
from harness import gate, timing
if sys.argv[1] == "steady":
    assert timing.steady_allocator()
torch.set_num_threads(2)  # with one thread glibc reuses the block either way
lay = [lay for lay in shapes.load("resnet50") if lay.name == "layer1.0.conv3"][0]
w, x = gate.make_inputs(lay, 1, torch.float32, "cpu")
run = kernels.get("dense_cpu").prepare(lay, w, 0.0, {"layout": "nchw"})
for _ in range(5):
    run(x)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    run(x)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


@pytest.mark.parametrize("regime", ["default", "steady"])
def test_in_the_workers_allocator_regime_a_convolution_does_not_page_fault(regime):
    """With glibc's default, moving thresholds, resnet50 layer1.0.conv3's dense run page-faults
    its 3.2 MB output in on every call (over a thousand faults), and whether it does depended
    on the calls before it: the dense run beside a sparse kernel was slower than in its own row
    on an idle machine. The workers fix the thresholds: no faults. Counted, not timed."""
    r = subprocess.run([sys.executable, "-c", FAULTS, regime], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    faults = float(r.stdout.split()[-1])
    assert (faults > 500) if regime == "default" else (faults < 5), faults


def test_the_worker_serves_in_the_steady_regime(monkeypatch):
    import harness.worker as worker

    called = []
    monkeypatch.setattr(contention.time, "sleep", lambda s: None)
    monkeypatch.setattr("harness.timing.steady_allocator", lambda: called.append(1) or True)

    class Conn:
        def send(self, msg):
            pass

        def recv(self):
            raise EOFError

    monkeypatch.setattr("signal.signal", lambda *a: None)
    raised = []
    monkeypatch.setattr("harness.timing.raise_priority", lambda: raised.append(1) or -20)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    worker.serve(Conn())
    assert called == [1] and raised == [1]  # steady allocator, raised priority
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter times nothing that counts
    worker.serve(Conn())
    assert called == [1, 1] and raised == [1]


class Nices:
    """A stand-in for the scheduler: every thread's niceness, and the lowest one this process
    may set (root: -20; an RLIMIT_NICE of r: 20 - r; otherwise none lower than now)."""

    def __init__(self, now, lowest):
        self.now, self.lowest, self.set = now, lowest, {}

    def get(self, tid):
        return self.set.get(tid, self.now)

    def put(self, tid, n):
        if n < self.lowest:
            raise PermissionError(1, "Operation not permitted")
        self.set[tid] = n


def test_timing_asks_for_a_higher_priority_for_every_thread_and_takes_what_is_allowed():
    import threading

    from harness.timing import raise_priority

    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        root = Nices(0, -20)
        assert raise_priority(-20, root.put, root.get, rlimit=0) == -20
    finally:
        stop.set()
        other.join()
    assert other.native_id in root.set and 0 in root.set  # every thread, not one
    assert set(root.set.values()) == {-20}
    capped = Nices(0, 20 - 25)  # RLIMIT_NICE 25: down to -5, not -20
    assert raise_priority(-20, capped.put, capped.get, rlimit=25) == -5
    plain = Nices(0, 0)  # no privilege, no limit: stays as started
    assert raise_priority(-20, plain.put, plain.get, rlimit=0) == 0 and not plain.set
    started_high = Nices(-20, -20)  # never lowers a priority it was given
    assert raise_priority(-5, started_high.put, started_high.get, rlimit=0) == -20
    assert not started_high.set


PRIORITY = r"""
import os, threading, time
from harness.timing import raise_priority
stop = threading.Event()
before = threading.Thread(target=stop.wait); before.start()
got = raise_priority(int(os.environ["WANT"]))
seen = []
after = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0)))
after.start(); after.join()
print(got, os.getpriority(os.PRIO_PROCESS, before.native_id), seen[0], os.nice(0))
stop.set()
"""


ALLOWED = "import os; os.setpriority(os.PRIO_PROCESS, 0, 5)"


def test_a_timing_process_s_threads_all_run_at_the_priority_it_got():
    """Linux keeps a niceness per thread: a thread started before the call and one started
    after it run at the niceness the process got, as does its main thread. Started at nice
    10 and asking for 5, which takes privilege or an RLIMIT_NICE of 15 or more: whether this
    machine allows it is asked of the system directly, by a plain setpriority."""
    allowed = subprocess.run(["nice", "-n", "10", sys.executable, "-c", ALLOWED],
                             capture_output=True, text=True, timeout=60).returncode == 0
    r = subprocess.run(["nice", "-n", "10", sys.executable, "-c", PRIORITY], cwd=ROOT,
                       env={**env(), "WANT": "5"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [int(v) for v in r.stdout.split()] == [5 if allowed else 10] * 4, r.stdout


def test_a_bad_priority_setting_is_one_error_line(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSECONV_NICE", "fast")
    code, out, err = cli("bench", "--quick", "--db", str(tmp_path / "r.db"))
    assert code == 2 and err.startswith("error: SPARSECONV_NICE") and "Traceback" not in err


@pytest.mark.parametrize("value, want", [("", -20), ("-5", -5), ("off", None), ("0", None),
                                         ("5", ValueError), ("-21", ValueError),
                                         ("fast", ValueError)])
def test_the_priority_setting_is_a_niceness_from_minus_20_to_0_or_off(monkeypatch, value, want):
    from harness.timing import wanted_nice

    monkeypatch.setenv("SPARSECONV_NICE", value)
    if want is ValueError:
        with pytest.raises(ValueError, match="SPARSECONV_NICE"):
            wanted_nice()
    else:
        assert wanted_nice() == want


def test_the_header_says_whether_timing_runs_ahead_of_other_work():
    from harness.timing import priority_words

    assert "ahead of other work" in priority_words(-20, -20)
    got_less = priority_words(-5, -20)
    assert "not the -20 asked for" in got_less and "ulimit -e 40" in got_less
    assert "ahead" not in got_less and "not raised" in priority_words(0, None)


def test_steal_time_counts_as_our_threads_waiting():
    """A hypervisor that gives our vCPUs to other guests shows in no run queue of ours: its
    steal time counts as waiting, so other work holding cores that way is contention."""

    class Stolen(Recorded):
        def __init__(self):
            super().__init__([0.8], waits=[0.0])
            self.stolen = 0.0

        def steal(self):
            return self.stolen

        def advance(self):
            super().advance()
            self.stolen += 0.8

    rec = Stolen()
    mon = contention.Monitor(reader=rec, clock=rec.clock)
    mon.start()
    rec.advance()
    share, wait = mon.stop()
    assert share == pytest.approx(0.8) and wait == pytest.approx(0.8)
    assert contention.contended(share, wait)


def test_an_unreadable_wait_is_unknown_not_zero(tmp_path, monkeypatch):
    """Without scheduler statistics every thread's schedstat reads '0 0 0': that is no reading,
    and the share alone decides."""
    for t in (1, 2):
        (tmp_path / str(t)).mkdir()
        (tmp_path / str(t) / "schedstat").write_text("0 0 0\n")
    monkeypatch.setattr(contention.glob, "glob",
                        lambda pattern: [str(tmp_path / t / "schedstat") for t in ("1", "2")])
    assert contention.ProcReader().runq_wait() is None
    seen, *_ = run_rounds([0.8], 2, waits=[None], max_share=0.25)
    assert seen.runq is None and seen.contended
