"""Autotuner: strategies on deterministic synthetic costs, the tuning database's reuse and
refusal, and plans that round-trip and validate."""

import json
import math
import subprocess
import sys

import pytest
from test_harness import ROOT, cs_cpu_kernels, env

import kernels
from harness import plan
from harness.autotune import strategy
from harness.records import Candidate, Config
from harness.store import Store


def grid():
    """A synthetic space: two kernels with different parameters, a known optimum."""
    out = [Candidate("a", Config({"T": t, "ob": ob, "split": sp}))
           for t in (1, 2, 3, 4, 6, 8) for ob in (8, 32, 128) for sp in ("pixels", "channels")]
    out += [Candidate("b", Config({"N": n, "T": t})) for n in (4, 8, 16, 32) for t in (1, 2, 3)]
    return out


def synthetic_cost(c):
    cfg = c.config
    if c.kernel == "a":
        return (1.0 + 0.1 * (cfg["T"] - 6) ** 2 + 0.002 * abs(cfg["ob"] - 32)
                + (0.3 if cfg["split"] == "pixels" else 0.0))
    return 2.0 + 0.05 * abs(cfg["N"] - 16) + 0.1 * cfg["T"]


OPTIMUM = min(grid(), key=synthetic_cost)


def run_strategy(name, budget, seed=0, cost=synthetic_cost):
    s = strategy(name)(grid(), budget, seed)
    while (c := s.ask()) is not None:
        s.tell(c, cost(c))
    return s


def test_exhaustive_visits_every_candidate_once_and_finds_the_optimum():
    s = run_strategy("exhaustive", None)
    assert s.evaluations == len(grid())
    best, cost = s.best()
    assert best == OPTIMUM and cost == synthetic_cost(OPTIMUM)


@pytest.mark.parametrize("seed", range(5))
def test_model_strategy_finds_the_optimum_with_a_quarter_of_the_evaluations(seed):
    budget = len(grid()) // 4
    s = run_strategy("model", budget, seed)
    assert s.evaluations <= budget
    best, cost = s.best()
    assert cost <= synthetic_cost(OPTIMUM) * 1.05


def test_random_strategy_respects_budget_and_never_repeats():
    s = run_strategy("random", 20, seed=3)
    assert s.evaluations == 20 and len(s.history) == 20
    s_all = run_strategy("random", len(grid()), seed=3)
    assert s_all.best()[0] == OPTIMUM


def test_model_strategy_survives_failed_candidates():
    def cost(c):
        return math.inf if c.kernel == "a" and c.config["T"] == 6 else synthetic_cost(c)
    s = run_strategy("model", 30, seed=1, cost=cost)
    best, c = s.best()
    assert math.isfinite(c) and best.config.get("T") != 6 or best.kernel == "b"


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="valid: exhaustive, random, model"):
        strategy("annealing")


def make_plan(**over):
    layers = [{"layer": "l1", "index": 1, "count": 3, "shape": "64->64 1x1 @56x56",
               "kernel": "cs_cpu_direct", "config": {"M": 4}, "time_s": 0.001, "dense_s": 0.004,
               "speedup": 4.0},
              {"layer": "l2", "index": 2, "count": 1, "shape": "3->64 7x7 s2 p3 @224x224",
               "kernel": "dense_cpu", "config": {"layout": "nchw"}, "time_s": 0.002,
               "dense_s": 0.002, "speedup": 1.0}]
    p = {"schema": plan.SCHEMA, "net": "resnet50", "pattern": "cs", "sparsity": 0.9375, "device": "cpu",
         "batch": 1, "dtype": "float32", "threads": 2, "strategy": "model",
         "fingerprint": {"cpu": "x"}, "identity": "abc", "machine_hash": "def",
         "layers": layers,
         "network_speedup": (3 * 0.004 + 0.002) / (3 * 0.001 + 0.002)}
    p.update(over)
    return p


def test_plan_round_trips_and_validates(tmp_path):
    path = plan.save(make_plan(), tmp_path / "p.json")
    loaded = plan.load(path)
    assert loaded.to_dict() == json.loads(json.dumps(make_plan()))
    assert loaded.layers[0].kernel == "cs_cpu_direct" and loaded.by_shape[
        loaded.layers[1].shape].layer == "l2"


@pytest.mark.parametrize("change,message", [
    ({"schema": 99}, "schema 99"),
    ({"network_speedup": 9.0}, "does not match"),
    ({"layers": []}, "no layers"),
    ({"net": 5}, "'net' must be str"),
])
def test_plan_validation_rejects_bad_plans(tmp_path, change, message):
    with pytest.raises(plan.PlanError, match=message):
        plan.validate(make_plan(**change))


def test_every_refusal_of_a_plan_made_for_something_else_is_the_plan_s_own():
    from harness.records import Device

    made = make_plan()
    made["layers"][0]["source_hash"] = kernels.get("cs_cpu_direct").source_hash()
    p = plan.Plan.of(made)
    p.check("resnet50", "cs", 0.9375, 1, "abc", Device.CPU)  # the one it was made for
    for args, message in [(("vgg19", "cs", 0.9375, 1, "abc"), "made for net 'resnet50'"),
                          (("resnet50", "1xn", 0.9375, 1, "abc"), "made for pattern 'cs'"),
                          (("resnet50", "cs", 0.5, 1, "abc"), "made for sparsity 0.9375"),
                          (("resnet50", "cs", 0.9375, 8, "abc"), "made for batch 1"),
                          (("resnet50", "cs", 0.9375, 1, "xyz"), "another machine")]:
        with pytest.raises(plan.PlanError, match="plan refused: .*" + message):
            p.check(*args, Device.CPU)
    with pytest.raises(plan.PlanError, match="made for device cpu"):
        p.check("resnet50", "cs", 0.9375, 1, "abc", Device.CUDA)
    made["layers"][0]["source_hash"] = "0" * 16
    with pytest.raises(plan.PlanError, match="source of cs_cpu_direct changed"):
        plan.Plan.of(made).check("resnet50", "cs", 0.9375, 1, "abc", Device.CPU)


def test_plan_validation_checks_kernels_and_configs():
    p = make_plan()
    p["layers"][0]["config"] = {"M": 3}
    with pytest.raises(plan.PlanError, match="not in its space"):
        plan.validate(p)
    p["layers"][0]["kernel"] = "warp_drive"
    with pytest.raises(plan.PlanError, match="unknown kernel"):
        plan.validate(p)
    with pytest.raises(plan.PlanError, match="no plan at"):
        plan.load("/nonexistent/plan.json")


def autotune_args(tmp_path, *args):
    return ["autotune", "--net", "resnet50", "--layers", "layer4.1.conv2", "--threads", "1",
            "--db", tmp_path / "t.sqlite", "--out-dir", tmp_path / "plans", *args]


def autotune(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "harness",
                           *map(str, autotune_args(tmp_path, *args))], cwd=ROOT,
                          env=env(HARNESS_PLUGINS=""), capture_output=True, text=True,
                          timeout=900)


def test_autotune_writes_a_valid_plan_and_reuses_the_tuning_database(tmp_path):
    r = autotune(tmp_path, "--strategy", "random", "--budget", "4")
    assert r.returncode == 0, r.stderr
    p = plan.load(tmp_path / "plans" / "resnet50_cs_0.9375_cpu.json")
    (lay,) = p.layers
    assert lay.layer == "layer4.1.conv2" and lay.count == 2
    assert lay.speedup >= 1.0 - 1e-9  # dense is a candidate: never slower than dense
    store = Store(tmp_path / "t.sqlite")
    n = len(store.tuning())
    defaults = cs_cpu_kernels()
    assert n == 2 + defaults + 4  # two dense layouts, each CS kernel's default, four random
    # same key: nothing measured again
    r2 = autotune(tmp_path, "--strategy", "random", "--budget", "4")
    assert r2.returncode == 0, r2.stderr
    assert "(measured 0, raced 4)" in r2.stdout and len(store.tuning()) == n
    # another machine's records are refused with a message, then measured again
    store.db.execute("UPDATE tuning SET identity = 'other-machine', tune_key = tune_key || 'x'")
    r3 = autotune(tmp_path, "--strategy", "random", "--budget", "4")
    assert r3.returncode == 0, r3.stderr
    assert "measured with another machine or software" in r3.stdout
    assert len(store.tuning()) == 2 * n


def test_autotune_bad_input_exits_2(tmp_path, cli):
    code, _, err = cli(*autotune_args(tmp_path, "--sparsity", "0.9,0.5"))
    assert code == 2 and "one value" in err
    code, _, err = cli(*autotune_args(tmp_path, "--patterns", "ovw"))
    assert code == 2 and "no cpu kernel implements pattern(s) ovw" in err
    for bad in (["--threads", "0"], ["--budget", "0"], ["--time-budget", "-5"]):
        code, _, err = cli(*autotune_args(tmp_path, *bad))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith("error: ")


def test_autotune_with_no_sparse_candidate_says_so_and_exits_2(tmp_path, cli):
    # CS at 0.9 has K=10, not a power of two: every layer would stay dense
    code, out, err = cli(*autotune_args(tmp_path, "--sparsity", "0.9"))
    assert code == 2, out
    assert "no sparse candidate" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "plans").exists()


def test_candidates_are_hashable_values():
    a = Candidate("k", Config({"T": 4, "M": 2}))
    b = Candidate("k", {"M": 2, "T": 4})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.config == {"M": 2, "T": 4}
    with pytest.raises(AttributeError):
        a.config.x = 1


class _StubEvaluator:
    """tune_layer's view of an Evaluator: every sparse candidate 1% faster than dense by its
    median, beating dense in ``wins`` of the confirmation race's rounds."""

    def __init__(self, wins):
        from harness.records import Device
        from shapes import ConvLayer

        self.layer = ConvLayer(net="t", name="t", index=0, cin=64, cout=64, kh=3, kw=3,
                               stride=1, padding=1, h=14, w=14)
        self.S, self.device, self.dtype, self.measured = 0.5, Device.CPU, "float32", 0
        self.wins = wins

    def dense(self):
        return 1.0, "nchw"

    def dense_candidate(self, layout=None):
        return Candidate("dense_cpu", Config({"layout": layout or "nchw"}))

    def cost(self, cand):
        return 0.99

    def race(self, cands):
        return [1.0] + [0.99] * (len(cands) - 1), [None] + [self.wins] * (len(cands) - 1)


@pytest.mark.parametrize("wins,sparse", [(0.5, False), (0.72, False), (0.8, True), (1.0, True)])
def test_a_kernel_replaces_dense_only_where_it_won_most_race_rounds(wins, sparse):
    from harness.autotune.tuner import tune_layer

    res = tune_layer(_StubEvaluator(wins), ["cs"], "random", budget=3)
    assert (res.best.kernel != "dense_cpu") is sparse
    assert res.best_s == (0.99 if sparse else 1.0)


class _RacingWorker:
    """The worker's side of a race: replies in turn from ``replies`` (medians, contended)."""

    def __init__(self, *replies):
        self.replies, self.calls = list(replies), 0

    def call(self, req, timeout):
        from harness.records import RaceReply

        medians, contended = self.replies[min(self.calls, len(self.replies) - 1)]
        self.calls += 1
        n = len(medians)
        return RaceReply(medians=medians, reasons=(None,) * n, win_rates=(None,) + (1.0,) * (n - 1),
                         contended=contended)


def _evaluator(worker, said):
    from harness.autotune.tuner import Evaluator
    from harness.records import Device
    from shapes import ConvLayer

    lay = ConvLayer(net="t", name="t", index=0, cin=64, cout=64, kh=3, kw=3, stride=1, padding=1,
                    h=14, w=14)
    return Evaluator(None, worker, "me", lay, 0.5, 1, "float32", Device.CPU, 1, log=said.append)


def test_the_tuner_s_race_applies_the_sweep_s_plausibility_and_contention_checks():
    """At S=0.5 (FLOP ideal 2x) a candidate racing 10x dense twice is never taken; one that
    did so once and was plausible when raced again is; a race contended twice gives nothing
    to take, one contended once is raced again and used."""
    cands = [Candidate("dense_cpu", Config({"layout": "nchw"})),
             Candidate("cs_cpu_direct", Config({"M": 2})), Candidate("cs_cpu_direct", Config({"M": 4}))]
    said = []
    ev = _evaluator(_RacingWorker(((1.0, 0.1, 0.8), False)), said)
    times, _ = ev.race(cands)
    assert times == [1.0, math.inf, 0.8] and ev.flagged == 1 and ev.worker.calls == 2
    assert "above the FLOP ideal 2.00x twice" in said[0]
    ev = _evaluator(_RacingWorker(((1.0, 0.1, 0.8), False), ((1.0, 0.6, 0.8), False)), [])
    assert ev.race(cands)[0] == [1.0, 0.6, 0.8] and ev.flagged == 0
    ev = _evaluator(_RacingWorker(((1.0, 0.6, 0.8), True)), said)
    assert ev.race(cands)[0] == [math.inf] * 3 and ev.flagged == 1 and ev.worker.calls == 2
    ev = _evaluator(_RacingWorker(((1.0, 0.6, 0.8), True), ((1.0, 0.7, 0.8), False)), [])
    assert ev.race(cands)[0] == [1.0, 0.7, 0.8] and ev.flagged == 0


def test_win_rate_pairs_the_interleaved_rounds():
    from harness.timing import win_rate

    assert win_rate([1, 2, 3, 4], [2, 1, 4, 5]) == 0.75
    assert win_rate([1, 1, 9], [2, 2]) == 1.0  # rounds both were timed in
    assert win_rate(None, [1.0]) is None and win_rate([1.0], []) is None


def test_tuning_records_are_typed_and_the_store_answers_the_tuner_s_questions(tmp_path):
    """The tuning table's columns are ``TuningRecord``'s fields; the store finds a key's newest
    record and a record of the same candidate measured under another identity, so the tuner
    runs no SQL of its own."""
    import dataclasses

    from harness.records import TuningRecord
    from harness.store import TUNING_COLUMNS

    assert list(TUNING_COLUMNS) == [f.name for f in dataclasses.fields(TuningRecord)]
    store = Store(tmp_path / "t.sqlite")
    have = [r[1] for r in store.db.execute("PRAGMA table_info(tuning)")]
    assert have == ["id", *TUNING_COLUMNS]
    rec = TuningRecord(tune_key="k1", identity="me", kernel="cs_cpu_direct", source_hash="s1",
                       shape="sh", batch=1, dtype="float32", pattern="cs", sparsity=0.75,
                       config={"M": 4, "T": 2}, status="ok", median_s=2e-3, dense_median_s=4e-3)
    store.add_tuning(rec)
    store.add_tuning(dataclasses.replace(rec, median_s=1e-3, created=None))
    got = store.latest_tuning("k1")
    assert got.seconds == 1e-3 and got.config == '{"M": 4, "T": 2}' and got.created > 0
    assert store.latest_tuning("nope") is None
    assert [r.median_s for r in store.tuning_records("sh")] == [2e-3, 1e-3]
    assert store.tuning_records("other") == []
    assert store.tuned_elsewhere("cs_cpu_direct", "sh", 0.75, 1, "float32").identity == "me"
    assert store.tuned_elsewhere("cs_cpu_direct", "sh", 0.5, 1, "float32") is None
    failed = dataclasses.replace(rec, status="incorrect", median_s=None)
    assert failed.seconds is None
