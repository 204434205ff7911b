"""Sweeps on a Ray cluster (``--executor ray``).

The unit of work sent to a node is one layer's whole group of cases (its dense baselines and
every sparse case), so every speedup is still measured interleaved on one machine in one run.
Each node runs one ``NodeRunner`` actor holding all its CPUs (one group at a time); inside it
the usual worker process keeps its isolation (a hang becomes ``timeout``, a crash
``runtime_error``) and builds the node's own C++ kernels. Results come back through Ray and
land in the driver's store, each row with the fingerprint and Ray node id of the node that
measured it. A group whose node dies is run again on another node (bounded retries); a group is
stored only when it has finished, so no case is stored twice. Code reaches the nodes as Ray
``py_modules`` (the project's packages and any plugin modules), not through a shared folder.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict

from . import UsageError
from .records import Device, E2EMeasurement, E2EResult, Measurement, Status, TimingOptions

MAX_RETRIES = 2  # a group is tried on at most this many more nodes after a node dies


LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def on_loopback(address: str | None) -> bool:
    """A local instance (no address) or a cluster whose head is this machine's loopback."""
    if address is None:
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host in LOOPBACK


def require_ray(address: str | None = None):
    """Ray, imported so that a local instance, or a cluster bound to 127.0.0.1, is used on
    127.0.0.1 only. Ray turns a 127.0.0.1 node or bootstrap address into this machine's
    network address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: a local instance then
    listened on every interface, and a driver sent to a 127.0.0.1 cluster (whose GCS listens
    there only) waited forever on the network address."""
    if on_loopback(address):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    imported = "ray" in sys.modules
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray: pip install 'sparseconv-bench[ray]' (or "
                         "pip install ray)") from None
    if imported and on_loopback(address):  # read when Ray was imported: too late for the env
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] != "0"
    return ray


def runtime_env() -> dict:
    """The project's packages and the plugin modules, shipped to every node by Ray."""
    import harness
    import kernels
    import shapes
    from kernels.registry import import_plugin, plugin_modules

    mods = [harness, kernels, shapes]
    mods += [sys.modules.get(name) or import_plugin(name) for name in plugin_modules()]
    # the driver's harness settings travel too (plugins, interpreter, SPARSECONV_*), except the
    # machine label: that one belongs to each node
    env = {k: v for k, v in os.environ.items()
           if k in ("HARNESS_PLUGINS", "TRITON_INTERPRET") or
           (k.startswith("SPARSECONV_") and k != "SPARSECONV_MACHINE_LABEL")}
    return {"py_modules": mods, "env_vars": env}


def connect(address: str | None):
    """Join the cluster at ``address`` or start a local Ray instance, which listens on
    127.0.0.1 only (a real cluster is its owner's to secure: Ray's token authentication, a
    private network)."""
    from .interrupts import reclaim

    ray = require_ray(address)
    if not ray.is_initialized():
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=False,
                 include_dashboard=False, configure_logging=False)
        reclaim()  # Ray's core worker installs a SIGTERM handler that aborts the process
    return ray


def _node_runner_class(ray):
    @ray.remote(max_restarts=0, max_task_retries=0)
    class NodeRunner:
        """One per node: runs a layer's group of cases on this node's worker process."""

        def __init__(self, timing: TimingOptions, case_timeout: float):
            from harness import env
            from harness.runner import CaseRunner

            self.fp = dict(env.fingerprint())
            self.identity, self.machine = env.identity_hash(self.fp), env.machine_hash(self.fp)
            self.node_id = ray.get_runtime_context().get_node_id()
            self.runner = CaseRunner(timing, case_timeout)

        def info(self) -> dict:
            return {"fingerprint": self.fp, "identity": self.identity,
                    "machine": self.machine, "node_id": self.node_id}

        def run_group(self, cases) -> list:
            self.runner.prepare(cases)
            return [(case, self.runner.run(case)) for case in cases]

        def run_e2e(self, req, timeout: float):
            """One whole network on this node (its worker process, its kernels)."""
            from harness.runner import run_case

            return run_case(self.runner.worker, req, timeout, result=E2EResult)

        def tune_layer(self, layer, patterns, sparsity, batch, dtype, device, threads,
                       strategy, budget, seed, rows) -> tuple:
            """Tune one layer here, against a private copy of the tuning records the driver
            sent; returns the result and the records measured here (the driver stores them)."""
            import kernels
            from harness.autotune.tuner import Evaluator, tune_layer
            from harness.runner import init_kernels
            from harness.store import Store

            if not self.runner.states:
                self.runner.states = init_kernels(
                    self.runner.worker, kernels.names(device=device.kernel_device), 1800)
            skip = {n for n, st in self.runner.states.items() if st.status is Status.COMPILE_ERROR}
            mem = Store(":memory:")
            for row in rows:
                mem.add_tuning(row)
            ev = Evaluator(mem, self.runner.worker, self.identity, layer, sparsity, batch, dtype,
                           device, threads, log=lambda *_: None)
            res = tune_layer(ev, patterns, strategy, budget, seed, None, skip)
            new = mem.tuning_records()[len(rows):]
            mem.close()
            return res, new, ev.raced

    return NodeRunner


def groups_of(cases) -> list[list]:
    """Cases grouped by layer group (baselines first, as built), in build order."""
    out = defaultdict(list)
    for c in cases:
        out[c.group].append(c)
    return list(out.values())


def start_runners(ray, timing, case_timeout, gpus: bool = False):
    """One actor per alive node, pinned to it, holding all its CPUs; for a GPU sweep
    (``gpus``), one actor per GPU of a GPU node, each with an equal share of its CPUs."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cls = _node_runner_class(ray)
    actors = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        cpus = max(1, int(node["Resources"].get("CPU", 1)))
        n_gpu = int(node["Resources"].get("GPU", 0)) if gpus else 0
        if gpus and not n_gpu:  # a CPU-only node (often the head) takes no GPU work
            continue
        pin = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        if n_gpu:
            actors += [cls.options(num_cpus=max(1, cpus // n_gpu), num_gpus=1,
                                   scheduling_strategy=pin).remote(timing, case_timeout)
                       for _ in range(n_gpu)]
        else:
            actors.append(cls.options(num_cpus=cpus, scheduling_strategy=pin).remote(
                timing, case_timeout))
    if gpus and not actors:
        raise UsageError("--device cuda: no alive node of the Ray cluster has a GPU")
    infos = ray.get([a.info.remote() for a in actors])
    return list(zip(actors, infos))


def dispatch(ray, runners, jobs, submit, done, lost, stop=None) -> list:
    """Run ``jobs`` on ``runners`` (``(actor, info)`` pairs), one job per runner at a time, in
    order. ``submit(actor, info, job)`` returns the task's object ref, or None when there is
    nothing to run (the runner stays idle); ``done(info, job, result)`` takes what came back;
    a job whose node died is tried again on another node, at most ``MAX_RETRIES`` more times,
    then ``lost(info, job)`` records it. No runner of a node that died is given work again
    (a GPU node runs one per GPU); when none is left this raises. ``stop()`` true: no new job
    starts and the jobs not started are returned."""
    pending = [(j, 0) for j in jobs]
    idle, busy, alive, unrun = list(runners), {}, list(runners), []
    while pending or busy:
        if stop is not None and stop() and pending:
            unrun += [j for j, _ in pending]
            pending = []
        while idle and pending:
            actor, info = idle.pop(0)
            job, tries = pending.pop(0)
            ref = submit(actor, info, job)
            if ref is None:
                idle.append((actor, info))
            else:
                busy[ref] = (actor, info, job, tries)
        if not busy:
            continue
        ready, _ = ray.wait(list(busy), num_returns=1, timeout=1.0)
        for ref in ready:
            actor, info, job, tries = busy.pop(ref)
            try:
                result = ray.get(ref)
            except node_lost(ray):  # every runner of that node is gone (one per GPU)
                alive = [r for r in alive if r[1]["node_id"] != info["node_id"]]
                idle = [r for r in idle if r[1]["node_id"] != info["node_id"]]
                if tries < MAX_RETRIES and alive:
                    pending.insert(0, (job, tries + 1))  # another node takes it
                else:
                    lost(info, job)
                if not alive:
                    raise UsageError("every node of the Ray cluster died") from None
                continue
            done(info, job, result)
            idle.append((actor, info))
    return unrun


def sweep(cases, store, run_id, *, address=None, resume=True, retry_failed=False,
          case_timeout=300.0, timing=None, progress=True):
    """Run the sweep's layer groups on the cluster; returns counts by status for this call."""
    from .interrupts import Stop
    from .runner import progress_bar

    ray = connect(address)
    timing = timing or TimingOptions()
    runners = start_runners(ray, timing, case_timeout,
                            gpus=any(c.device is Device.CUDA for c in cases))
    if not runners:
        raise UsageError("the Ray cluster has no alive node")
    for info in {r[1]["identity"]: r[1] for r in runners}.values():  # machine details
        store.note_machine(info["fingerprint"], info["identity"], info["machine"],
                           {"ray_node": info["node_id"]})
    done = {}  # identity -> case keys already stored under it

    def done_for(identity):
        if identity not in done:
            done[identity] = store.done_keys(identity, retry_failed=retry_failed) \
                if resume else set()
        return done[identity]

    counts: dict = {}
    skipped = 0
    bar = progress_bar(len(cases), progress, desc="bench (ray)")

    def submit(actor, info, group):
        nonlocal skipped
        keys = done_for(info["identity"])
        if all(c.key in keys for c in group):  # stored for this node's identity
            skipped += len(group)
            bar.update(len(group))
            return None
        # the whole group runs (its baselines time the sparse cases); only cases not yet
        # stored under this identity are stored
        return actor.run_group.remote(group)

    def finished(info, group, results):
        nonlocal skipped
        keys = done_for(info["identity"])
        for case, res in results:
            if case.key in keys:
                skipped += 1
            else:
                _store(store, case, res, run_id, info, counts)
                keys.add(case.key)
            bar.update(1)

    def lost(info, group):
        for case in group:
            _store(store, case, _lost(info), run_id, info, counts)
            bar.update(1)

    try:
        with Stop() as stop:
            unrun = dispatch(ray, runners, groups_of(cases), submit, finished, lost,
                             stop=lambda: stop.requested)
        if unrun:
            counts["not run (stopped)"] = sum(len(g) for g in unrun)
    finally:
        bar.close()
        for actor, _ in runners:
            ray.kill(actor)
    counts["skipped (already measured)"] = skipped
    return counts


def node_lost(ray) -> tuple:
    """The exceptions Ray raises for a task whose actor or node died."""
    ex = ray.exceptions
    return (ex.RayActorError, ex.ActorDiedError, ex.NodeDiedError, ex.WorkerCrashedError)


def _lost(info, result=None):
    from .records import CaseResult

    return (result or CaseResult)(Status.RUNTIME_ERROR,
                                  f"node {info['node_id'][:8]} died; no retries left")


def _store(store, case, res, run_id, info, counts):
    m = Measurement.of(case, res, run_id, info["identity"], info["machine"],
                       node=f"ray:{info['node_id']}", created=time.time())
    store.add(m)
    counts[m.status.value] = counts.get(m.status.value, 0) + 1


def tune(store, layers, patterns, sparsity, batch, dtype, device, threads, strategy, budget,
         seed, address=None, progress=True):
    """Tune each layer on a node of the cluster, one layer per node at a time. Nodes of
    different machines or software are refused: a plan belongs to one machine. Returns
    ``(fingerprint, identity, [LayerResult])``; the tuning records the nodes measure land in
    ``store`` (the driver's store stays the only one)."""
    from .autotune.tuner import TIMING, shape_key

    ray = connect(address)
    runners = start_runners(ray, TIMING, 120.0, gpus=device is Device.CUDA)
    if not runners:
        raise UsageError("the Ray cluster has no alive node")
    kinds = {}
    for _, info in runners:
        kinds.setdefault(info["identity"], []).append(info["node_id"][:8])
    if len(kinds) > 1:
        for actor, _ in runners:
            ray.kill(actor)
        raise UsageError(
            f"the cluster's nodes are {len(kinds)} different machines or software ("
            + "; ".join(f"identity {k[:8]}: nodes {', '.join(v)}" for k, v in kinds.items())
            + "); autotune refuses to mix them: a plan belongs to one machine. Tune on a "
              "cluster of identical nodes")
    (_, info), = {r[1]["identity"]: r for r in runners}.values()
    tuning = store.tuning_records()  # as the tuning starts: each node gets its shape's part
    results: dict = {}
    print(f"  tuning {len(layers)} layer(s) on {len(runners)} node(s)", flush=True)

    def submit(actor, ainfo, job):
        _, lay = job
        shape = shape_key(lay, threads)
        rows = [r for r in tuning if r.shape == shape]
        return actor.tune_layer.remote(lay, patterns, sparsity, batch, dtype, device, threads,
                                       strategy, budget, seed, rows)

    def done(ainfo, job, result):
        i, lay = job
        res, new, raced = result
        for row in new:
            store.add_tuning(row)
        results[i] = res
        print(f"  [{len(results)}/{len(layers)}] {lay.name:22s} {res.best.kernel:14s} "
              f"{res.dense_s / res.best_s:5.2f}x  evals {res.evaluations}/"
              f"{res.candidates} (measured {res.measured}, raced {raced}) on node "
              f"{ainfo['node_id'][:8]}", flush=True)

    def lost(ainfo, job):
        raise UsageError(f"tuning {job[1].name}: the node(s) it was sent to died (last "
                         f"{ainfo['node_id'][:8]}); no plan written")

    try:
        dispatch(ray, runners, list(enumerate(layers)), submit, done, lost)
    finally:
        for actor, _ in runners:
            ray.kill(actor)
    return info["fingerprint"], info["identity"], [results[i] for i in sorted(results)]


def e2e(store, run_id, jobs, make_request, *, address=None, timeout=3600.0, fresh=False,
        log=print, gpus: bool = False):
    """Whole networks on the cluster, one network per node at a time. ``jobs`` are opaque
    descriptions; ``make_request(job, identity)`` turns one into ``(E2ERequest, what was
    decided)`` for the node that will run it (plans are checked against that node's
    identity). Returns the case keys measured or found."""
    ray = connect(address)
    runners = start_runners(ray, TimingOptions(), timeout, gpus=gpus)  # GPU jobs: 1 GPU each
    if not runners:
        raise UsageError("the Ray cluster has no alive node")
    for info in {r[1]["identity"]: r[1] for r in runners}.values():
        store.note_machine(info["fingerprint"], info["identity"], info["machine"],
                           {"ray_node": info["node_id"]})
    keys: list = []
    done: dict = {}  # identity -> networks already measured (one query per identity)
    requests: dict = {}  # job index -> its request, for the node it was last sent to

    def submit(actor, info, job):
        n, what = job
        req, said = make_request(what, info["identity"])
        if req.case.key not in keys:
            keys.append(req.case.key)
        log(f"  {what}: {said} (node {info['node_id'][:8]})")
        if not fresh and info["identity"] not in done:
            done[info["identity"]] = store.e2e_done(info["identity"])
        if not fresh and req.case.key in done[info["identity"]]:
            log("    already measured with this identity (--fresh to repeat)")
            return None
        requests[n] = req
        return actor.run_e2e.remote(req, timeout)

    def finished(info, job, res):
        req = requests[job[0]]
        m = E2EMeasurement.of(req.case, res, run_id, info["identity"], info["machine"],
                              node=f"ray:{info['node_id']}")
        store.add_e2e(m)
        log(f"    {job[1]}: {m.status}" + (f", {m.speedup:.2f}x measured" if m.speedup
                                              else f": {m.reason}"))

    try:
        dispatch(ray, runners, list(enumerate(jobs)), submit, finished,
                 lambda info, job: finished(info, job, _lost(info, E2EResult)))
    finally:
        for actor, _ in runners:
            ray.kill(actor)
    return keys
