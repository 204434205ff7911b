"""Sweeps and tuning on a Ray cluster (Ray's own multi-node test cluster on this machine, bound to
127.0.0.1: a head and a worker node with 1 CPU each, the worker started with another HOME), and
merging stores."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import descendants, listening, loopback, reaped, stop, wait_gone
from test_harness import ROOT, SHAPES, bench, cs_cpu_kernels, env, rows

from harness import analysis
from harness.store import Store

LAYERS = ["--layers", "a,b,c", "--kernels", "cs_cpu_direct,bsr_1xn_cpu", "--sparsities", "0.5",
          "--quick"]


# ---- merge ----------------------------------------------------------------------------------
def merge(*args):
    return subprocess.run([sys.executable, "-m", "harness", "merge", *map(str, args)], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # three sweeps (66 s): CI runs it with the other slow tests
def test_a_merge_of_two_shards_equals_one_unsharded_run(tmp_path):
    sweep = ["--kernels", "cs_cpu_direct", "--sparsities", "0.5,0.75", "--quick"]
    for i in range(2):
        r = bench(tmp_path, *sweep, "--shard", f"{i}/2", db=tmp_path / f"s{i}.sqlite")
        assert r.returncode == 0, r.stderr
    r = bench(tmp_path, *sweep, db=tmp_path / "all.sqlite")
    assert r.returncode == 0, r.stderr
    m = merge(tmp_path / "s0.sqlite", tmp_path / "s1.sqlite", "-o", tmp_path / "m.sqlite")
    assert m.returncode == 0, m.stderr
    merged, whole = rows(tmp_path / "m.sqlite"), rows(tmp_path / "all.sqlite")
    assert merged.case_key.is_unique
    assert set(merged.case_key) == set(whole.case_key)
    assert len(Store(tmp_path / "m.sqlite").runs()) == 2  # runs renumbered, both kept
    # merging a shard again adds nothing: the most recent row of a case wins
    again = merge(tmp_path / "s0.sqlite", "-o", tmp_path / "m.sqlite")
    assert again.returncode == 0, again.stderr
    assert len(rows(tmp_path / "m.sqlite")) == len(merged)


def test_merging_a_foreign_file_exits_2(tmp_path, cli):
    other = tmp_path / "other.sqlite"
    c = sqlite3.connect(other)
    c.execute("CREATE TABLE invoices (id INTEGER)")
    c.commit()
    c.close()
    Store(tmp_path / "ok.sqlite").close()
    code, _, err = cli("merge", tmp_path / "ok.sqlite", other, "-o", tmp_path / "m.sqlite")
    assert code == 2 and "another program" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m.sqlite").exists()


def test_executor_ray_without_ray_says_what_to_install(tmp_path):
    fake = tmp_path / "noray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no ray here')\n")
    shapes = tmp_path / "tiny.csv"
    shapes.write_text(SHAPES)
    r = subprocess.run([sys.executable, "-m", "harness", "bench", "--shapes-csv", str(shapes),
                        "--nets", "", "--db", str(tmp_path / "r.sqlite"), "--executor", "ray"],
                       cwd=ROOT, env={**env(HARNESS_PLUGINS=""), "PYTHONPATH": f"{fake.parent}:{ROOT}"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "pip install" in r.stderr and "ray" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---- a two-node cluster ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def node_home(tmp_path_factory):
    return tmp_path_factory.mktemp("node2-home")


@pytest.fixture
def cluster(node_home, request):
    """A head and a worker node (another HOME). The worker shares this machine's C++ build
    cache (keyed by CPU flags and sources, so sharing is safe), except with the parameter
    "own-build", which proves a node builds its own kernels; any other parameter labels the
    worker as another kind of machine."""
    from ray.cluster_utils import Cluster

    from kernels import _ext

    param = getattr(request, "param", None)
    # every process of the test cluster listens on 127.0.0.1 only (Ray runs code for anyone
    # who reaches its ports)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                      "node_ip_address": "127.0.0.1"})
    extra = {"SPARSECONV_MACHINE_LABEL": param} if param and param != "own-build" else {}
    if param == "own-build":  # the default cache, under the node's own HOME
        extra.update(SPARSECONV_BUILD_DIR="", TORCH_EXTENSIONS_DIR="")
    else:
        extra["SPARSECONV_BUILD_DIR"] = str(_ext.build_dir())
    worker = c.add_node(num_cpus=1, node_ip_address="127.0.0.1",
                        env_vars={"HOME": str(node_home), **extra})
    c.wait_for_nodes()
    yield c, worker
    c.shutdown()


def ray_bench(tmp_path, address, *args, plugins="faulty_kernels", **kw):
    return bench(tmp_path, *LAYERS, "--executor", "ray", "--ray-address", address, *args,
                 plugins=plugins, timeout=1200, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("cluster", ["own-build"], indirect=True)
def test_a_cluster_sweep_equals_the_local_one_and_uses_both_nodes(tmp_path, cluster, node_home):
    c, _ = cluster
    local = bench(tmp_path, *LAYERS, db=tmp_path / "local.sqlite")
    assert local.returncode == 0, local.stderr
    r = ray_bench(tmp_path, c.address, db=tmp_path / "ray.sqlite")
    assert r.returncode == 0, r.stderr
    a, b = rows(tmp_path / "local.sqlite"), rows(tmp_path / "ray.sqlite")
    assert b.case_key.is_unique
    assert dict(zip(a.case_key, a.status)) == dict(zip(b.case_key, b.status))
    assert b.node.str.startswith("ray:").all() and b.node.nunique() == 2
    # each layer's group ran on one node: its ratios are measured interleaved there
    assert (b.groupby("layer").node.nunique() == 1).all()
    # the worker node built its own C++ kernels under its own HOME
    assert list(node_home.glob(".cache/sparseconv/sparseconv_cs_*/sparseconv_cs_*.so"))
    # the same command with the confirmation pass: nothing is measured again, and the best
    # and runner-up of every layer, pattern and sparsity race dense on the cluster's nodes
    again = ray_bench(tmp_path, c.address, "--confirm", db=tmp_path / "ray.sqlite")
    assert again.returncode == 0, again.stderr
    assert len(rows(tmp_path / "ray.sqlite")) == len(b)
    got = Store(tmp_path / "ray.sqlite").measurements()
    ok = got[(got.pattern != "dense") & (got.status == "ok") & ~analysis.flagged(got)]
    slots = ok.groupby(["layer", "pattern"]).ngroups  # a busy machine may have flagged some
    assert slots and f"confirmation: {slots} layer/pattern/sparsity best(s) raced" in \
        again.stdout, again.stdout
    raced = got[got.conf_rank.notna()]
    assert len(raced) and raced.conf_speedup.notna().all()
    assert set(raced.fp_hash) == set(b.fp_hash)  # raced under the nodes' own identity


@pytest.mark.slow
@pytest.mark.parametrize("cluster", ["a-second-kind-of-machine"], indirect=True)
def test_a_mixed_cluster_confirms_each_kinds_rows_on_a_node_of_that_kind(tmp_path, cluster):
    """The worker node is labelled another kind of machine: each kind's best rows are raced
    (a race goes only to a node of the identity its rows were measured under); before, only
    the rows of the machine running the command were, and the other kind's stayed unconfirmed
    sweep maxima."""
    c, _ = cluster
    r = ray_bench(tmp_path, c.address, "--confirm", db=tmp_path / "ray.sqlite")
    assert r.returncode == 0, r.stderr
    got = Store(tmp_path / "ray.sqlite").measurements()
    assert got.fp_hash.nunique() == 2, got.node.unique()  # both kinds measured
    ok = got[(got.pattern != "dense") & (got.status == "ok") & ~analysis.flagged(got)]
    raced = got[got.conf_rank.notna()]
    assert set(raced.fp_hash) == set(ok.fp_hash)  # every kind with a best row has it raced
    slots = ok.groupby(["fp_hash", "layer", "pattern"]).ngroups
    assert f"confirmation: {slots} layer/pattern/sparsity best(s) raced" in r.stdout, r.stdout


BLOCKER = '''
import os
import time
from pathlib import Path

import torch.nn.functional as F

from kernels import Kernel, Run, register

MARK = Path(os.environ["SPARSECONV_BLOCKER_MARK"])


@register
class Blocker(Kernel):
    """Blocks on the node whose HOME is the marked one (until the node is removed); elsewhere a
    correct unstructured kernel."""

    name = "blocker"
    pattern = "unstructured"
    space = {"v": (0,)}

    def _prepare(self, layer, weight, sparsity, config):
        wm = self.make_pattern(sparsity, config).apply(weight)
        block = os.environ.get("HOME") == os.environ["SPARSECONV_BLOCKER_HOME"]

        def call(x, out=None):
            if block:
                MARK.write_text("started")
                while True:
                    time.sleep(1)
            y = F.conv2d(x, wm, stride=layer.stride, padding=layer.padding)
            return y if out is None else out.copy_(y)

        return Run(wm, call)
'''


@pytest.mark.slow
def test_removing_a_node_mid_group_loses_and_duplicates_nothing(tmp_path, cluster, node_home):
    c, worker = cluster
    plug = tmp_path / "plug"
    plug.mkdir()
    (plug / "blocker.py").write_text(BLOCKER)
    mark = tmp_path / "started"
    shapes = tmp_path / "tiny.csv"
    shapes.write_text(SHAPES)
    e = {**env(HARNESS_PLUGINS="blocker"), "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}:{plug}",
         "SPARSECONV_BLOCKER_MARK": str(mark), "SPARSECONV_BLOCKER_HOME": str(node_home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "bench", "--shapes-csv", str(shapes), "--nets", "",
         "--db", str(tmp_path / "r.sqlite"), "--rounds", "3", "--min-sample", "0.0002",
         "--no-progress", "--threads", "1", "--layers", "a,b,c,d", "--kernels",
         "blocker,cs_cpu_direct", "--sparsities", "0.5", "--quick", "--executor", "ray",
         "--ray-address", c.address], cwd=ROOT, env=e, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        t_end = time.time() + 600
        while not mark.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < t_end, "the blocking case never started on the worker node"
            time.sleep(0.5)
        c.remove_node(worker)
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    df = rows(tmp_path / "r.sqlite")
    assert df.case_key.is_unique and len(df) == 4 * (2 + 2)  # 4 layers: 2 dense, 2 sparse
    assert (df.status == "ok").all(), df[["kernel", "status", "reason"]]


@pytest.mark.slow
@pytest.mark.parametrize("cluster", ["a-second-kind-of-machine"], indirect=True)
def test_autotune_refuses_to_mix_machines(tmp_path, cluster):
    c, _ = cluster
    r = subprocess.run([sys.executable, "-m", "harness", "autotune", "--net", "resnet50",
                        "--layers", "layer4.1.conv2", "--threads", "1", "--db",
                        str(tmp_path / "t.sqlite"), "--out-dir", str(tmp_path / "plans"),
                        "--budget", "2", "--executor", "ray", "--ray-address", c.address],
                       cwd=ROOT, env=env(HARNESS_PLUGINS=""), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "2 different machines" in r.stderr and "refuses to mix" in r.stderr
    assert not (tmp_path / "plans").exists()


@pytest.mark.slow
def test_autotune_on_two_identical_nodes_writes_the_plan_from_the_driver_store(tmp_path,
                                                                               cluster):
    c, _ = cluster
    r = subprocess.run([sys.executable, "-m", "harness", "autotune", "--net", "resnet50",
                        "--layers", "layer4.1.conv2,layer3.1.conv2", "--threads", "1", "--db",
                        str(tmp_path / "t.sqlite"), "--out-dir", str(tmp_path / "plans"),
                        "--strategy", "random", "--budget", "2", "--executor", "ray",
                        "--ray-address", c.address], cwd=ROOT, env=env(HARNESS_PLUGINS=""),
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr
    p = json.loads((tmp_path / "plans" / "resnet50_cs_0.9375_cpu.json").read_text())
    assert {lay["layer"] for lay in p["layers"]} == {"layer4.1.conv2", "layer3.1.conv2"}
    n = len(Store(tmp_path / "t.sqlite").tuning())
    defaults = cs_cpu_kernels()
    assert n == 2 * (2 + defaults + 2)  # per layer: two dense layouts, each CS kernel's
    # default, two candidates
    assert os.path.getsize(tmp_path / "t.sqlite") > 0


@pytest.mark.slow
def test_e2e_on_the_cluster_stores_each_network_with_its_node(tmp_path, cluster):
    c, _ = cluster
    r = subprocess.run([sys.executable, "-m", "harness", "e2e", "--nets", "resnet18",
                        "--patterns", "cs,1xn", "--size", "32", "--rounds", "3", "--threads",
                        "1", "--db", str(tmp_path / "e.sqlite"), "--plans", str(tmp_path),
                        "--engines", "none", "--no-alone", "--executor", "ray",
                        "--ray-address", c.address], cwd=ROOT,
                       env=env(HARNESS_PLUGINS=""), capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr
    df = Store(tmp_path / "e.sqlite").e2e()
    assert sorted(df.pattern) == ["1xn", "cs"] and (df.status == "ok").all()
    assert df.node.str.startswith("ray:").all() and (df.rel_err < 1e-4).all()


# ---- Ray listens on loopback only; SIGTERM on Ray --------------------------------------------
def watch_listening(proc, roots, limit=600) -> set:
    """Every listening socket of ``roots`` and their descendants while ``proc`` runs."""
    seen, t_end = set(), time.time() + limit
    while proc.poll() is None and time.time() < t_end:
        pids = [p for r in roots for p in [r, *descendants(r)]]
        seen |= set(listening(pids))
        time.sleep(0.5)
    return seen


def start_ray_bench(tmp_path, *args, plugins=""):
    shapes = tmp_path / "tiny.csv"
    shapes.write_text(SHAPES)
    return subprocess.Popen(
        [sys.executable, "-m", "harness", "bench", "--shapes-csv", str(shapes), "--nets", "",
         "--db", str(tmp_path / "r.sqlite"), "--rounds", "3", "--min-sample", "0.0002",
         "--no-progress", "--threads", "1", "--sparsities", "0.5", "--quick", "--executor",
         "ray", *args], cwd=ROOT, env=env(HARNESS_PLUGINS=plugins), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def assert_loopback_only(seen):
    names = {name for _, _, name in seen}
    assert {"gcs_server", "raylet"} <= names, seen
    assert [s for s in seen if not loopback(s[0])] == [], seen


@pytest.mark.slow
def test_a_local_ray_instance_listens_on_loopback_only(tmp_path):
    proc = start_ray_bench(tmp_path, "--layers", "a", "--kernels", "cs_cpu_direct")
    try:
        seen = watch_listening(proc, [proc.pid])
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert_loopback_only(seen)


@pytest.mark.slow
def test_a_sweep_on_the_loopback_test_cluster_runs_and_nothing_listens_beyond_it(tmp_path,
                                                                                 cluster):
    """The harness joins a cluster bound to 127.0.0.1 (it sat idle, dialling the machine's
    network address, before); no process of the cluster or the sweep listens elsewhere."""
    c, _ = cluster
    proc = start_ray_bench(tmp_path, "--layers", "a,b", "--kernels", "cs_cpu_direct",
                           "--ray-address", c.address)
    try:
        seen = watch_listening(proc, [os.getpid()], limit=300)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert len(rows(tmp_path / "r.sqlite")) == 2 * 3
    assert_loopback_only(seen)


def spawned_workers() -> set[int]:
    """The harness worker processes (multiprocessing spawn) below this test process."""
    out = set()
    for pid in descendants(os.getpid()):
        try:
            if b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.add(pid)
        except OSError:
            continue
    return out


@pytest.mark.slow
def test_sigterm_on_a_ray_sweep_records_it_stopped_and_ends_the_node_workers(tmp_path, cluster):
    c, _ = cluster
    before = spawned_workers()
    proc = start_ray_bench(tmp_path, "--layers", "a,b", "--kernels", "faulty_hang",
                           "--case-timeout", "600", "--ray-address", c.address,
                           plugins="faulty_kernels")
    with reaped(proc):
        t_end = time.time() + 300
        while len(spawned_workers() - before) < 2:  # both nodes are inside a group
            assert proc.poll() is None, proc.communicate()
            assert time.time() < t_end, "the groups never started"
            time.sleep(0.5)
        time.sleep(3.0)  # the hanging cases are in the workers now
        workers = spawned_workers() - before
        out, err = stop(proc, signal.SIGTERM, timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert wait_gone(workers, limit=30) == []
    runs = Store(tmp_path / "r.sqlite").runs()
    assert runs.status.iloc[0] == "stopped"  # the sweep's run (node notes follow it)


# ---- the dispatch loop every Ray command shares (a stand-in for Ray: nodes die on demand) -----
class _FakeRay:
    class exceptions:  # noqa: N801 - mirrors ray.exceptions
        class RayActorError(Exception):
            pass

        class ActorDiedError(RayActorError):
            pass

        NodeDiedError = WorkerCrashedError = ActorDiedError

    def __init__(self):
        self.calls = []  # (actor name, job) in submission order

    @staticmethod
    def wait(refs, num_returns, timeout):
        return refs[:1], refs[1:]

    def get(self, ref):
        actor, job = ref.actor, ref.job
        if actor["dead"]:
            raise self.exceptions.ActorDiedError(actor["name"])
        return job * 10


class _Ref:  # an object ref: hashable, like Ray's
    def __init__(self, actor, job):
        self.actor, self.job = actor, job


def _info(node_id):
    from harness.execute import NodeInfo

    return NodeInfo({}, "identity", "machine", f"ray:{node_id}", node_id)


def _runners(*dead, node=None):
    return [({"name": n, "dead": d}, _info(node or n)) for n, d in zip("abcd", dead)]


def _dispatch(ray, runners, jobs, **kw):
    import harness.execute.ray as cluster

    done, lost = [], []

    def submit(actor, info, job):
        ray.calls.append((actor["name"], job))
        return None if job in kw.get("skip", ()) else _Ref(actor, job)

    unrun = cluster.dispatch(ray, runners, jobs, submit,
                             lambda info, job, res: done.append((info.node_id, job, res)),
                             lambda info, job: lost.append(job), stop=kw.get("stop"))
    return done, lost, unrun


def test_dispatch_moves_a_dead_nodes_job_to_a_live_node_and_never_uses_the_dead_one_again():
    ray = _FakeRay()
    done, lost, unrun = _dispatch(ray, _runners(False, True, False), [1, 2, 3, 4, 5, 6])
    assert sorted(j for _, j, _ in done) == [1, 2, 3, 4, 5, 6] and not lost and not unrun
    assert all(res == 10 * j for _, j, res in done)
    assert [j for n, j in ray.calls if n == "b"] == [2]  # one job reached the dead node
    assert {n for n, _, _ in done} == {"a", "c"}


def test_dispatch_records_a_job_lost_after_its_retries_and_raises_when_no_node_is_left():
    import harness.execute.ray as cluster
    from harness import UsageError

    ray, lost = _FakeRay(), []
    with pytest.raises(UsageError, match="every node"):
        cluster.dispatch(ray, _runners(True, True, True), [7], lambda a, i, j: _Ref(a, j),
                         lambda *a: None, lambda info, job: lost.append((info.node_id, job)))
    assert lost == [("c", 7)]  # tried on a, then on b and c (MAX_RETRIES more), then lost
    assert cluster.MAX_RETRIES == 2
    ray, lost, done = _FakeRay(), [], []  # three dead nodes and a live one
    runners = _runners(True, True, True) + [({"name": "d", "dead": False}, _info("d"))]
    cluster.dispatch(ray, runners, [7, 8], lambda a, i, j: _Ref(a, j),
                     lambda info, job, res: done.append((info.node_id, job)),
                     lambda info, job: lost.append(job))
    # 7: a, c died (2 tries), d; 8: b died, d. Both finish on the live node, nothing is lost
    assert not lost and sorted(done) == [("d", 7), ("d", 8)]


def test_dispatch_skips_what_submit_declines_and_returns_what_a_stop_left_unstarted():
    ray = _FakeRay()
    done, lost, unrun = _dispatch(ray, _runners(False), [1, 2, 3], skip={2})
    assert [j for _, j, _ in done] == [1, 3] and not lost and not unrun
    ray = _FakeRay()
    started = []
    done, lost, unrun = _dispatch(ray, _runners(False), [1, 2, 3],
                                  stop=lambda: started.append(1) or len(started) > 1)
    assert [j for _, j, _ in done] == [1] and unrun == [2, 3]


def test_dispatch_hands_a_job_one_runner_declines_to_another_and_drops_one_all_decline():
    """Two kinds of machine: each job runs only on a runner of its kind (``submit`` declines
    it elsewhere), whichever runner is idle first; a job of a kind no runner has is lost; a
    job that needs no run is dropped where it is first offered.
    Before, a job the first idle runner declined was dropped, so a cluster of several machine
    kinds ran each kind's jobs only where they happened to land."""
    import harness.execute.ray as cluster

    ray, done = _FakeRay(), []
    runners = _runners(False, False)  # a: kind "x", b: kind "y"
    kind = {"a": "x", "b": "y"}
    jobs = [("y", 1), ("y", 2), ("x", 3), ("z", 4), ("y", 5)]

    def submit(actor, info, job):
        ray.calls.append((actor["name"], job))
        if job[0] == "done":
            return None  # needs no run (already stored): dropped, not offered elsewhere
        return _Ref(actor, job) if kind[actor["name"]] == job[0] else cluster.DECLINE

    ray.get = lambda ref: ref.job[1] * 10
    lost = []
    unrun = cluster.dispatch(ray, runners, jobs + [("done", 6)], submit,
                             lambda info, job, res: done.append((info.node_id, job[1], res)),
                             lambda info, job: lost.append(job))
    assert sorted(done) == [("a", 3, 30), ("b", 1, 10), ("b", 2, 20), ("b", 5, 50)]
    assert not unrun
    assert {n for n, j in ray.calls if j[1] == 4} == {"a", "b"}  # asked of both, run by neither
    assert lost == [("z", 4)]  # and recorded as lost: no node of its kind
    assert [n for n, j in ray.calls if j[1] == 6] == ["a"]  # asked once, never re-offered


def test_dispatch_gives_no_more_work_to_any_runner_of_a_node_that_died():
    """A GPU node runs one actor per GPU: when one of them dies with its node, the others on that
    node must not use up the job's retries."""
    import harness.execute.ray as cluster

    ray, done, lost = _FakeRay(), [], []
    gpu_node = _runners(True, True, node="g")  # two actors (GPUs) of one node, which dies
    live = [({"name": "z", "dead": False}, _info("z"))]

    def submit(actor, info, job):
        ray.calls.append((actor["name"], job))
        return _Ref(actor, job)

    cluster.dispatch(ray, gpu_node + live, [1], submit,
                     lambda info, job, res: done.append((info.node_id, job)),
                     lambda info, job: lost.append(job))
    # the job's retry skips the idle sibling on the dead node and goes to the live one
    assert ray.calls == [("a", 1), ("z", 1)] and done == [("z", 1)] and not lost
