"""The command drivers over the executor interface (``harness.drivers``, ``harness.execute``):
what a driver stores, skips, re-sends and counts does not depend on which executor runs it. An
executor here is a stand-in that runs the node's work in this process with made-up timings, so
these tests say nothing about timing and need no worker process."""

from __future__ import annotations

import pytest

from harness import cases, drivers
from harness.execute import Executor, LocalExecutor, NodeInfo
from harness.records import CaseResult, Status, TimingOptions
from harness.store import Store
from shapes import ConvLayer

LAYERS = [ConvLayer(net="tiny", name=n, index=i, cin=32, cout=32, kh=3, kw=3, stride=1,
                    padding=1, h=8, w=8) for i, n in enumerate("ab")]


def _cases():
    return cases.build(LAYERS, [0.5], ["dense_cpu", "cs_cpu_direct"], 1, "float32", "cpu", 1)


class FakeNode:
    """A node whose every case takes 2 ms (dense) or 1 ms (sparse); it notes what it was sent."""

    def __init__(self):
        self.sent, self.priors = [], {}

    def run_group(self, group, prior=None):
        self.priors[group[0].layer.name] = prior
        for case in group:
            self.sent.append(case.key)
            yield case, CaseResult(Status.OK, median_s=2e-3 if case.is_dense else 1e-3,
                                   dense_median_s=None if case.is_dense else 2e-3)


class FakeExecutor(Executor):
    """Jobs in order on one node per identity given; ``lose``: job indexes whose node dies (the
    executor gives them to ``lost``); ``stop_after``: a Ctrl-C after this many items."""

    def __init__(self, identities=("id-1",), lose=(), stop_after=None):
        self.nodes = [(NodeInfo({"hostname": f"h{i}"}, ident, f"m{i}", f"node{i}", f"n{i}"),
                       FakeNode()) for i, ident in enumerate(identities)]
        self.multinode = len(self.nodes) > 1
        self.lose, self.stop_after = set(lose), stop_after

    def infos(self):
        return [info for info, _ in self.nodes]

    def run(self, jobs, call, done, lost=None):
        items, unrun = 0, []
        for n, job in enumerate(jobs):
            info, node = self.nodes[n % len(self.nodes)]
            if self.stop_after is not None and items >= self.stop_after:
                unrun.append(job)
                continue
            spec = call(info, job)
            if spec is None:
                continue
            if n in self.lose:
                lost(info, job)
                continue
            method, args = spec
            for item in getattr(node, method)(*args):
                done(info, job, item)
                items += 1
                if self.stop_after is not None and items >= self.stop_after:
                    unrun.append(job)
                    break
        return unrun


def test_a_sweep_stores_each_case_once_under_the_identity_of_the_node_that_ran_it(tmp_path):
    store, todo = Store(tmp_path / "r.sqlite"), _cases()
    ex = FakeExecutor(identities=("id-1", "id-2"))
    counts = drivers.sweep(ex, todo, store, 1, progress=False)
    assert counts == {drivers.SKIPPED: 0, "ok": len(todo)}
    df = store.measurements()
    assert sorted(df.case_key) == sorted(c.key for c in todo)
    by_layer = df.groupby("layer").fp_hash.unique().map(list).to_dict()
    assert by_layer == {"a": ["id-1"], "b": ["id-2"]}  # one group per node
    assert set(df.node) == {"node0", "node1"}
    # both machines are named in the store, each once
    assert {"id-1", "id-2"} <= set(store.runs().fp_hash)


def test_a_resumed_sweep_skips_what_is_stored_and_times_the_rest_against_stored_baselines(
        tmp_path):
    store, todo = Store(tmp_path / "r.sqlite"), _cases()
    b_dense = [c for c in todo if c.layer.name == "b" and c.is_dense]
    drivers.sweep(FakeExecutor(), [c for c in todo if c.layer.name == "a"] + b_dense, store, 1,
                  progress=False)
    ex = FakeExecutor()
    counts = drivers.sweep(ex, todo, store, 2, progress=False)
    stored_before = len([c for c in todo if c.layer.name == "a"]) + len(b_dense)
    assert counts[drivers.SKIPPED] == stored_before
    assert counts["ok"] == len(todo) - stored_before
    node = ex.nodes[0][1]
    assert set(node.sent) == {c.key for c in todo if c.layer.name == "b" and not c.is_dense}
    prior = node.priors["b"]  # the stored dense rows of b, not re-measured
    assert prior is not None and prior.seconds == pytest.approx(2e-3)
    # a fresh sweep sends everything and no stored baseline
    ex = FakeExecutor()
    counts = drivers.sweep(ex, todo, store, 3, resume=False, progress=False)
    assert counts == {drivers.SKIPPED: 0, "ok": len(todo)}
    assert ex.nodes[0][1].priors == {"a": None, "b": None}


def test_a_lost_group_is_stored_as_a_runtime_error_and_a_stop_counts_what_did_not_run(tmp_path):
    store, todo = Store(tmp_path / "r.sqlite"), _cases()
    n_a = len([c for c in todo if c.layer.name == "a"])
    counts = drivers.sweep(FakeExecutor(lose={1}), todo, store, 1, progress=False)
    df = store.measurements()
    lost = df[df.layer == "b"]
    assert len(lost) == len(todo) - n_a and set(lost.status) == {Status.RUNTIME_ERROR.value}
    assert lost.reason.str.contains("died; no retries left").all()
    assert counts["runtime_error"] == len(todo) - n_a and counts["ok"] == n_a
    store2 = Store(tmp_path / "s.sqlite")
    counts = drivers.sweep(FakeExecutor(stop_after=n_a + 1), todo, store2, 1, progress=False)
    assert counts["ok"] == n_a + 1
    assert counts[drivers.NOT_RUN] == len(todo) - n_a - 1 == len(todo) - len(
        store2.measurements())


def test_the_local_executor_hands_on_each_item_as_it_is_yielded_and_stops_between_items(
        monkeypatch):
    """A Ctrl-C while a group runs stops it after the case in flight, and the job comes back
    unrun; the node's generator is closed, so no later case of the group starts. (The first
    Ctrl-C is ``interrupts.Stop`` setting ``requested``; a stand-in sets it here, so no signal
    reaches the test process.)"""
    from harness.execute import local

    class FirstCtrlC:
        current = None

        def __init__(self):
            self.requested = False
            FirstCtrlC.current = self

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(local, "Stop", FirstCtrlC)
    ex = LocalExecutor(TimingOptions(), 10.0)
    started, closed = [], []

    def run_group(group, prior=None):
        try:
            for case in group:
                started.append(case)
                yield case, CaseResult(Status.OK)
        finally:
            closed.append(True)

    monkeypatch.setattr(ex.node, "run_group", run_group)
    got = []

    def done(info, job, item):
        got.append(item)
        if len(got) == 2:
            FirstCtrlC.current.requested = True

    group = _cases()[:5]
    unrun = ex.run([group, group], lambda info, job: ("run_group", (job,)), done)
    ex.close()
    assert len(got) == 2 and len(started) == 2 and closed == [True]
    assert unrun == [group, group]  # the job in flight and the one never started
    assert ex.infos()[0].identity and ex.infos()[0].node


def test_tune_refuses_nodes_of_different_machines_before_any_work(tmp_path):
    from harness import UsageError

    ex = FakeExecutor(identities=("id-1", "id-2"))
    with pytest.raises(UsageError, match="refuses to mix them"):
        drivers.tune(ex, Store(tmp_path / "r.sqlite"), [object()], log=lambda *_: None)
    assert all(not node.sent for _, node in ex.nodes)



def test_a_merge_keeps_each_confirmation_with_the_row_it_raced(tmp_path):
    """Two stores with confirmed rows merge into one: each confirmation still sits beside the
    measurement it raced (new row ids and run numbers), and one whose row a newer measurement
    of the same case replaced does not move to that newer row."""
    from harness.merge import merge
    from harness.records import Confirmation

    todo = _cases()
    a_cases = [c for c in todo if c.layer.name == "a"]
    stores = []
    for i, part in enumerate((a_cases, todo)):  # the second re-measures layer a, later
        st = Store(tmp_path / f"s{i}.sqlite")
        drivers.sweep(FakeExecutor(), part, st, st.start_run({}, "id-1", "m", {}),
                      progress=False)
        stores.append(st)
    s0, s1 = (st.measurements().set_index("case_key") for st in stores)
    sparse_a = next(c.key for c in a_cases if not c.is_dense)
    sparse_b = next(c.key for c in todo if c.layer.name == "b" and not c.is_dense)
    stores[0].add_confirmation(Confirmation(  # a row the second store's newer row replaces
        measurement_id=int(s0.loc[sparse_a, "id"]), case_key=sparse_a, fp_hash="id-1",
        run_id=1, rank=1, speedup=9.0))
    stores[1].add_confirmation(Confirmation(
        measurement_id=int(s1.loc[sparse_b, "id"]), case_key=sparse_b, fp_hash="id-1",
        run_id=1, rank=1, speedup=2.5, speedup_lo=2.0, speedup_hi=3.0))
    for st in stores:
        st.close()
    counts = merge([tmp_path / "s0.sqlite", tmp_path / "s1.sqlite"], tmp_path / "m.sqlite")
    assert counts["measurements"] == len(todo) and counts["confirmations"] == 1
    m = Store(tmp_path / "m.sqlite").measurements().set_index("case_key")
    assert m.loc[sparse_b, "conf_speedup"] == 2.5 and m.loc[sparse_b, "conf_speedup_hi"] == 3.0
    assert m.conf_speedup.notna().sum() == 1  # layer a's newer row carries no confirmation
    # merging again into the same output keeps it, once
    counts = merge([tmp_path / "s1.sqlite"], tmp_path / "m.sqlite")
    assert counts["confirmations"] == 1
    m = Store(tmp_path / "m.sqlite").measurements().set_index("case_key")
    assert m.loc[sparse_b, "conf_speedup"] == 2.5
