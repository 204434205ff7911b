"""One driver per command, each over an executor (``harness.execute``): ``sweep`` (``bench``,
``table --plan``), ``tune`` (``autotune``) and ``e2e``; the confirmation pass that ends ``bench``
is ``confirm.run``. A driver decides what to run and stores what comes back, as it comes back;
it never asks whether its executor is this machine or a Ray cluster."""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict

from . import UsageError, baseline
from .records import CaseResult, E2EMeasurement, E2EResult, Measurement, Status
from .runner import progress_bar

SKIPPED = "skipped (already measured)"
NOT_RUN = "not run (stopped)"


def note_nodes(executor, store) -> None:
    """A cluster's machines, each recorded in the store once (reports name them)."""
    if executor.multinode:
        for info in {i.identity: i for i in executor.infos()}.values():
            store.note_machine(info.fingerprint, info.identity, info.machine,
                               {"ray_node": info.node_id})


def lost_result(info, result=CaseResult):
    return result(Status.RUNTIME_ERROR, f"node {info.short} died; no retries left")


def groups_of(cases) -> list[list]:
    """Cases grouped by layer group (baselines first, as built), in build order."""
    out = defaultdict(list)
    for c in cases:
        out[c.group].append(c)
    return list(out.values())


def sweep(executor, cases, store, run_id, *, resume=True, retry_failed=False, progress=True,
          desc="bench") -> dict:
    """Run every case not yet recorded under the identity of the node that takes it, one layer
    group per job (its dense baselines time its sparse cases), storing each result as it
    arrives; returns counts by status for this call. A group resumed after its baselines ran
    times its sparse cases against the stored baselines."""
    note_nodes(executor, store)
    known: dict = {}  # identity -> (case keys stored under it, its stored dense baselines)

    def stored(identity):
        if identity not in known:
            keys, base = set(), baseline.Baselines()
            if resume:
                keys = store.done_keys(identity, retry_failed=retry_failed)
                base.note_rows(store.measurements(fp_hash=identity))
            known[identity] = keys, base
        return known[identity]

    counts: dict = {SKIPPED: 0}
    finished: set = set()  # case keys stored or skipped in this call
    sent: dict = {}  # job index -> the cases of its group sent to a node
    bar = progress_bar(len(cases), progress, desc=desc)
    bar.set_postfix_str("building / loading kernels")

    def call(info, job):
        i, group = job
        keys, base = stored(info.identity)
        todo = [c for c in group if c.key not in keys]
        for c in group:
            if c.key in keys and c.key not in finished:
                finished.add(c.key)
                counts[SKIPPED] += 1
                bar.update(1)
        if not todo:
            return None
        sent[i] = todo
        lay = group[0].layer
        bar.set_postfix_str(f"{lay.net}:{lay.name}" + (f" on {info.short}"
                                                       if executor.multinode else ""))
        return "run_group", (todo, base.choice(group[0].group))

    def keep(info, case, res):
        m = Measurement.of(case, res, run_id, info.identity, info.machine, node=info.node)
        store.add(m)
        stored(info.identity)[0].add(case.key)
        finished.add(case.key)
        counts[m.status.value] = counts.get(m.status.value, 0) + 1
        bar.update(1)

    def lost(info, job):
        for case in sent.get(job[0], ()):
            if case.key not in finished:
                keep(info, case, lost_result(info))

    try:
        unrun = executor.run(list(enumerate(groups_of(cases))), call,
                             lambda info, job, item: keep(info, *item), lost)
    finally:
        bar.close()
    if unrun:
        counts[NOT_RUN] = sum(c.key not in finished for c in cases)
    return counts


def e2e(executor, store, run_id, jobs, make_request, *, timeout, fresh=False, log=print,
        on_result=None, label=str) -> tuple[list[str], int]:
    """Whole networks, one per job. ``make_request(job, identity)`` turns a job into
    ``(E2ERequest, what was decided)`` for the node that will run it (plans are checked against
    that node's identity); ``label(job)`` names a job in the log; ``on_result(m)`` shows
    each stored ``E2EMeasurement``. Returns the case keys measured or found, and how many
    networks a Ctrl-C left unmeasured."""
    note_nodes(executor, store)
    keys: list = []
    done: dict = {}  # identity -> networks already measured (one query per identity)
    requests: dict = {}  # job index -> its request, for the node it was last sent to

    def call(info, job):
        n, what = job
        req, said = make_request(what, info.identity)
        if req.case.key not in keys:
            keys.append(req.case.key)
        log(f"  {label(what)}: {said}" + (f" (node {info.short})" if executor.multinode
                                                else ""))
        if not fresh and info.identity not in done:
            done[info.identity] = store.e2e_done(info.identity)
        if not fresh and req.case.key in done[info.identity]:
            log("    already measured with this identity (--fresh to repeat)")
            return None
        requests[n] = req
        return "run_e2e", (req, timeout)

    def finished(info, job, res):
        req = requests[job[0]]
        m = E2EMeasurement.of(req.case, res, run_id, info.identity, info.machine,
                              node=info.node)
        store.add_e2e(m)
        if on_result is not None:
            on_result(m)

    unrun = executor.run(list(enumerate(jobs)), call, finished,
                         lambda info, job: finished(info, job, lost_result(info, E2EResult)))
    return keys, len(unrun)


def tune(executor, store, jobs, *, time_budget=None, log=print):
    """Tune each layer (a ``TuneJob``) on a node, one layer per node at a time, each against
    the store's tuning records of its shape; the records the nodes measure land in ``store``
    as each layer ends. Nodes of different machines or software are refused: a plan belongs
    to one machine. Returns ``(NodeInfo, [LayerResult] in job order, comparison rows, layers
    not tuned because of a Ctrl-C)``."""
    from .autotune.tuner import shape_key

    kinds: dict = {}
    for info in executor.infos():
        kinds.setdefault(info.identity, []).append(info.short)
    if len(kinds) > 1:
        raise UsageError(
            f"the cluster's nodes are {len(kinds)} different machines or software ("
            + "; ".join(f"identity {k[:8]}: nodes {', '.join(v)}" for k, v in kinds.items())
            + "); autotune refuses to mix them: a plan belongs to one machine. Tune on a "
              "cluster of identical nodes")
    info = executor.infos()[0]
    if executor.multinode:
        log(f"  tuning {len(jobs)} layer(s) on {len(executor.infos())} node(s)")
    results: dict = {}
    compared: dict = {}
    warned: set = set()
    t0 = time.monotonic()

    def call(ninfo, item):
        i, job = item
        if time_budget is not None:  # the layers left share the time left
            left = max(0.0, time_budget - (time.monotonic() - t0))
            job = dataclasses.replace(job, seconds=left / (len(jobs) - i))
        rows = store.tuning_records(shape_key(job.layer, job.threads))
        return "tune_layer", (job, rows)

    def done(ninfo, item, out):
        i, job = item
        for row in out.records:
            store.add_tuning(row)
        for name, why in out.broken.items():
            if name not in warned:
                warned.add(name)
                log(f"warning: {name} is left out: {why}")
        for note in out.notes:
            log(note)
        r = out.result
        results[i], compared[i] = r, out.compared
        log(f"  [{len(results)}/{len(jobs)}] {job.layer.name:22s} {r.best.kernel:14s} "
            f"{r.dense_s / r.best_s:5.2f}x  evals {r.evaluations}/{r.candidates} (measured "
            f"{r.measured}, raced {out.raced})"
            + (f" on node {ninfo.short}" if executor.multinode else ""))

    def lost(ninfo, item):
        raise UsageError(f"tuning {item[1].layer.name}: the node(s) it was sent to died (last "
                         f"{ninfo.short}); no plan written")

    unrun = executor.run(list(enumerate(jobs)), call, done, lost)
    order = sorted(results)
    return (info, [results[i] for i in order], [row for i in order for row in compared[i]],
            len(jobs) - len(results) if unrun else 0)
