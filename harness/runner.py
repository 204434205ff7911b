"""Cases on a worker process: ``Worker`` starts and talks to the process, ``CaseRunner`` runs
cases one at a time on it (what a node of ``harness.execute`` holds). A case that passes its
time limit becomes ``timeout`` and the worker is replaced; one that kills the worker is
``runtime_error``."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

from tqdm import tqdm

from . import baseline
from . import worker as worker_mod
from .records import (
    CaseRequest,
    CaseResult,
    InitRequest,
    KernelState,
    Status,
    StopRequest,
    TimingOptions,
    WorkerFailure,
    WorkerReady,
)

START_TIMEOUT = 600.0  # seconds a new worker process may take to import what it needs


class WorkerDied(Exception):
    pass


class WorkerTimeout(Exception):
    pass


class Worker:
    def __init__(self, target=None):
        self.target = target or worker_mod.serve  # the serving loop the process runs
        self.proc = None
        self.conn = None

    def start(self, timeout: float = START_TIMEOUT):
        """Start the worker process and wait until it takes requests: its start-up (an
        interpreter, torch) is never charged to the time limit of the case sent first."""
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=self.target, args=(child, os.getpid()), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        try:
            reply = self._receive(timeout, f"worker process not ready within {timeout:g} s")
        except WorkerDied as e:
            raise WorkerDied(f"worker process did not start: {e}") from None
        if not isinstance(reply, WorkerReady):
            self.kill()
            raise WorkerDied(f"worker process did not start: it sent {type(reply).__name__}")

    def call(self, msg, timeout: float):
        if self.proc is None or not self.proc.is_alive():
            self.start()
        self.conn.send(msg)
        return self._receive(timeout, f"no result within {timeout:g} s")

    def _receive(self, timeout: float, late: str):
        t_end = time.monotonic() + timeout
        while True:
            left = t_end - time.monotonic()
            if left <= 0:
                self.kill()
                raise WorkerTimeout(late)
            try:
                if self.conn.poll(min(left, 0.25)):
                    return self.conn.recv()
            except (EOFError, OSError):
                pass
            if not self.proc.is_alive():
                code = self.proc.exitcode
                self.kill()
                sig = f" (signal {-code})" if code is not None and code < 0 else ""
                raise WorkerDied(f"worker process died with exit code {code}{sig}")

    def kill(self):
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(5)
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None

    def close(self):
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(StopRequest())
                self.proc.join(5)
            except (OSError, BrokenPipeError):
                pass
        self.kill()


class CaseRunner:
    """Runs cases one at a time on a worker process of this machine: builds each kernel once,
    turns unsupported combinations and kernels that cannot run here into typed results, and
    gives every sparse case the dense baseline measured before it in its group. Held by each
    node of an executor (``harness.execute.node``)."""

    def __init__(self, timing: TimingOptions, case_timeout: float, init_timeout: float = 1800.0):
        self.timing, self.case_timeout, self.init_timeout = timing, case_timeout, init_timeout
        self.worker = Worker()
        self.states: dict = {}
        self.dense = baseline.Baselines()

    def prepare(self, cases) -> None:
        """Load and build the kernels these cases need (once each)."""
        self.load(c.kernel for c in cases if c.unsupported is None)

    def load(self, names) -> None:
        """Load and build these kernels, those not loaded yet."""
        todo = sorted(set(names) - set(self.states))
        if todo:
            self.states.update(init_kernels(self.worker, todo, self.init_timeout))

    def run(self, case) -> CaseResult:
        state = self.states.get(case.kernel)
        if case.unsupported is not None:
            res = CaseResult(Status.UNSUPPORTED, case.unsupported)
        elif state is not None and state.status is not Status.OK:
            res = CaseResult(state.status, state.reason)
        else:
            res = run_case(self.worker, CaseRequest(case, self.timing,
                                                    self.dense.ref(case.group)),
                           self.case_timeout)
        if case.kernel in baseline.names() and res.status is Status.OK:
            self.dense.note(case.group, case.kernel, case.config, res.median_s,
                            res.kernel_median_s)
        return res

    def close(self) -> None:
        self.worker.close()

    def abandon(self) -> None:
        """Kill the worker and whatever case it is running (SIGTERM, a second Ctrl-C)."""
        self.worker.kill()


def progress_bar(total: int, enabled: bool, desc: str = "bench", unit: str = "case"):
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 10)


def init_kernels(wk: Worker, names, timeout: float) -> dict:
    """Kernel name -> KernelState, from the worker (which builds what needs building)."""
    try:
        reply = wk.call(InitRequest(tuple(names)), timeout)
    except (WorkerDied, WorkerTimeout) as e:
        reply = WorkerFailure(str(e))
    if isinstance(reply, WorkerFailure):
        return {n: KernelState(Status.RUNTIME_ERROR, f"kernel set-up failed: {reply.reason}")
                for n in names}
    return reply.states


def run_case(wk: Worker, req, timeout: float, result=CaseResult):
    """One request to the worker; a hang or a dead worker becomes a typed ``result``
    (``CaseResult``, or ``E2EResult`` for a whole network)."""
    try:
        res = wk.call(req, timeout)
    except WorkerTimeout as e:
        return result(Status.TIMEOUT, str(e))
    except WorkerDied as e:
        return result(Status.RUNTIME_ERROR, str(e))
    if isinstance(res, WorkerFailure):
        return result(Status.RUNTIME_ERROR, res.reason)
    return res
