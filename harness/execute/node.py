"""What one node does: the only work an executor sends. A node is one machine's worker process
with the kernels built for it (``runner.CaseRunner``); the same class runs in this process for
the local executor and inside a Ray actor on every node of a cluster. Each method is a
generator: the local executor hands on each item as it is yielded (a sweep stores every case as
it ends), a Ray node returns them all when the job ends."""

from __future__ import annotations

import socket

from .. import env
from ..records import E2EResult, Status
from ..runner import CaseRunner, WorkerDied, WorkerTimeout, run_case
from .base import NodeInfo


class Node:
    def __init__(self, timing, case_timeout: float, init_timeout: float = 1800.0,
                 node_id: str | None = None):
        self.fp = dict(env.fingerprint())
        self.identity = env.identity_hash(self.fp)
        self.node_id = node_id
        self.runner = CaseRunner(timing, case_timeout, init_timeout)

    def info(self) -> NodeInfo:
        label = f"ray:{self.node_id}" if self.node_id else (self.fp.get("hostname")
                                                             or socket.gethostname())
        return NodeInfo(self.fp, self.identity, env.machine_hash(self.fp), label, self.node_id)

    def run_group(self, cases, prior=None):
        """Yields ``(case, CaseResult)`` for each case of one layer group, in order (its dense
        baselines first). ``prior``: the group's best dense times stored by an earlier run of
        the same identity (``baseline.Choice``), for a group resumed after its baselines ran."""
        if prior is not None and cases:
            self.runner.dense.adopt(cases[0].group, prior)
        self.runner.prepare(cases)
        for case in cases:
            yield case, self.runner.run(case)

    def run_e2e(self, req, timeout: float):
        """Yields the ``E2EResult`` of one whole network."""
        yield run_case(self.runner.worker, req, timeout, result=E2EResult)

    def race(self, req, timeout: float):
        """Yields the ``RaceReply`` of one race, or a sentence on why there is none."""
        self.runner.load(c.kernel for c in req.cands)
        try:
            yield self.runner.worker.call(req, timeout)
        except (WorkerTimeout, WorkerDied) as e:
            yield str(e)

    def tune_layer(self, job, rows):
        """Yields the ``TuneOutcome`` of one ``TuneJob`` (``harness.autotune.tuner``), tuned here
        against a private copy of the tuning records the driver sent (``rows``, those of the
        layer's shape); the records measured here come back in it, for the driver's store."""
        import kernels

        from ..autotune.tuner import Evaluator, TuneOutcome
        from ..store import Store

        self.runner.load(kernels.names(device=job.device.kernel_device))
        broken = {n: st.reason for n, st in self.runner.states.items()
                  if st.status is Status.COMPILE_ERROR}
        mem = Store(":memory:")
        for row in rows:
            mem.add_tuning(row)
        notes: list[str] = []
        try:
            res, raced, compared = job.run(
                lambda quiet=False: Evaluator(
                    mem, self.runner.worker, self.identity, job.layer, job.sparsity, job.batch,
                    job.dtype, job.device, job.threads,
                    log=(lambda *_: None) if quiet else notes.append), skip=broken)
            yield TuneOutcome(res, tuple(mem.tuning_records()[len(rows):]), raced,
                              tuple(compared), broken, tuple(notes))
        finally:
            mem.close()

    def close(self) -> None:
        self.runner.close()

    def abandon(self) -> None:
        self.runner.abandon()
