"""The Ray executor (``--executor ray``): one node per machine of a Ray cluster.

Each node runs one ``NodeActor`` holding all its CPUs (for a GPU job, one per GPU), which holds
the same ``Node`` the local executor holds: the usual worker process keeps its isolation (a hang
becomes ``timeout``, a crash ``runtime_error``) and builds the node's own C++ kernels. A job
(for a sweep, one layer's whole group of cases, so every speedup is still measured interleaved
on one machine in one run) runs on one node; its items come back through Ray when it ends and
land in the driver's store, each row with the fingerprint and Ray node id of the node that
measured it. A job whose node dies is run again on another node (bounded retries); a job's items
are handed on only when it has finished, so nothing is stored twice. Code reaches the nodes as
Ray ``py_modules`` (the project's packages and any plugin modules), not through a shared
folder.
"""

from __future__ import annotations

import os
import sys

from .. import UsageError
from ..interrupts import Stop, reclaim
from .base import DECLINE, Executor, NodeInfo

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
    ray = require_ray(address)
    if not ray.is_initialized():
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=False,
                 include_dashboard=False, configure_logging=False)
        reclaim()  # Ray's core worker installs a SIGTERM handler that aborts the process
    return ray


def _node_actor_class(ray):
    @ray.remote(max_restarts=0, max_task_retries=0)
    class NodeActor:
        """One per node (one per GPU of a GPU node): the node's ``Node``, called by name."""

        def __init__(self, timing, case_timeout: float):
            from harness.execute.node import Node

            self.node = Node(timing, case_timeout,
                             node_id=ray.get_runtime_context().get_node_id())

        def info(self) -> NodeInfo:
            return self.node.info()

        def call(self, method: str, args) -> list:
            return list(getattr(self.node, method)(*args))

    return NodeActor


def start_runners(ray, timing, case_timeout, gpus: bool = False):
    """One actor per alive node, pinned to it, holding all its CPUs; for a GPU sweep
    (``gpus``), one actor per GPU of a GPU node, each with an equal share of its CPUs."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cls = _node_actor_class(ray)
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
    infos = ray.get([a.info.remote() for a in actors])  # NodeInfo of each
    return list(zip(actors, infos))


def dispatch(ray, runners, jobs, submit, done, lost, stop=None) -> list:
    """Run ``jobs`` on ``runners`` (``(actor, NodeInfo)`` pairs), one job per runner at a time, in
    order. ``submit(actor, info, job)`` returns the task's object ref, None where the job needs
    no run (it is dropped), or ``DECLINE`` where that runner must not run it (another kind of
    machine): the job waits for another runner, and once every live runner has declined it
    ``lost(info, job)`` records it. ``done(info, job, result)`` takes what came back; a job
    whose node died is tried again on another node, at most ``MAX_RETRIES`` more times, then
    ``lost(info, job)`` records it. No runner of a node that died is given work
    again (a GPU node runs one per GPU); when none is left this raises. ``stop()`` true: no new
    job starts and the jobs not started are returned."""
    pending = [(j, 0, set()) for j in jobs]  # job, tries, the runners that declined it
    idle, busy, alive, unrun = list(range(len(runners))), {}, list(range(len(runners))), []
    while pending or busy:
        if stop is not None and stop() and pending:
            unrun += [j for j, _, _ in pending]
            pending = []
        for r in list(idle):  # each idle runner takes the first job it does not decline
            for k, (job, tries, declined) in enumerate(pending):
                if r in declined:
                    continue
                ref = submit(*runners[r], job)
                if ref is DECLINE:
                    declined.add(r)
                    continue
                del pending[k]
                if ref is not None:
                    idle.remove(r)
                    busy[ref] = (r, job, tries)
                break
        for p in [p for p in pending if set(alive) <= p[2]]:  # no live runner takes it
            pending.remove(p)
            lost(runners[max(p[2])][1], p[0])
        if not busy:
            continue
        ready, _ = ray.wait(list(busy), num_returns=1, timeout=1.0)
        for ref in ready:
            r, job, tries = busy.pop(ref)
            info = runners[r][1]
            try:
                result = ray.get(ref)
            except node_lost(ray):  # every runner of that node is gone (one per GPU)
                dead = {i for i in alive if runners[i][1].node_id == info.node_id}
                alive = [i for i in alive if i not in dead]
                idle = [i for i in idle if i not in dead]
                if tries < MAX_RETRIES and alive:
                    pending.insert(0, (job, tries + 1, set()))  # another node takes it
                else:
                    lost(info, job)
                if not alive:
                    raise UsageError("every node of the Ray cluster died") from None
                continue
            done(info, job, result)
            idle.append(r)
    return unrun


class RayExecutor(Executor):
    multinode = True

    def __init__(self, timing, case_timeout: float, *, address=None, gpus: bool = False):
        self.ray = connect(address)
        self.runners = start_runners(self.ray, timing, case_timeout, gpus=gpus)
        if not self.runners:
            raise UsageError("the Ray cluster has no alive node")

    def infos(self) -> list[NodeInfo]:
        return [info for _, info in self.runners]

    def run(self, jobs, call, done, lost=None) -> list:
        def submit(actor, info, job):
            spec = call(info, job)
            return spec if spec is None or spec is DECLINE else actor.call.remote(*spec)

        def finished(info, job, items):
            for item in items:
                done(info, job, item)

        with Stop() as stop:
            return dispatch(self.ray, self.runners, list(jobs), submit, finished,
                            lost or (lambda info, job: None), stop=lambda: stop.requested)

    def close(self) -> None:
        for actor, _ in self.runners:
            self.ray.kill(actor)
        self.runners = []


def node_lost(ray) -> tuple:
    """The exceptions Ray raises for a task whose actor or node died."""
    ex = ray.exceptions
    return (ex.RayActorError, ex.ActorDiedError, ex.NodeDiedError, ex.WorkerCrashedError)
