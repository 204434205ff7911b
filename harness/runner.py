"""Sweep runner: cases go one at a time to a worker process; each result is committed to the
store as it arrives. A case that passes its time limit is recorded as ``timeout`` and the worker
is replaced; one that kills the worker is ``runtime_error``. Ctrl-C stops after the case in
flight (a second Ctrl-C aborts at once), SIGTERM abandons it (see :mod:`harness.interrupts`);
everything finished is already saved."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

from tqdm import tqdm

from . import baseline
from . import worker as worker_mod
from .interrupts import Stop
from .records import (
    CaseRequest,
    CaseResult,
    InitRequest,
    KernelState,
    Measurement,
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
    gives every sparse case the dense baseline measured before it in its group. Used by the
    local sweep and by each node of a cluster."""

    def __init__(self, timing: TimingOptions, case_timeout: float, init_timeout: float = 1800.0):
        self.timing, self.case_timeout, self.init_timeout = timing, case_timeout, init_timeout
        self.worker = Worker()
        self.states: dict = {}
        self.dense = baseline.Baselines()

    def prepare(self, cases) -> None:
        """Load and build the kernels these cases need (once each)."""
        names = sorted({c.kernel for c in cases if c.unsupported is None} - set(self.states))
        if names:
            self.states.update(init_kernels(self.worker, names, self.init_timeout))

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


def sweep(cases, store, run_id, fp_hash, machine_hash, *, resume=True, retry_failed=False,
          case_timeout=300.0, init_timeout=1800.0, timing=None, progress=True, node=None):
    """Run every case not yet recorded under this identity; returns counts by status for this
    call. Each case's result is committed as it arrives."""
    timing = timing or TimingOptions()
    done = store.done_keys(fp_hash, retry_failed=retry_failed) if resume else set()
    todo = [c for c in cases if c.key not in done]
    counts = {"skipped (already measured)": len(cases) - len(todo)}
    runner = CaseRunner(timing, case_timeout, init_timeout)
    if resume:  # dense baselines measured by an earlier, interrupted run of the same identity
        runner.dense.note_rows(store.measurements(fp_hash=fp_hash))
    bar = progress_bar(len(todo), progress)
    try:
        with Stop() as stop:
            bar.set_postfix_str("building / loading kernels")
            runner.prepare(todo)
            for case in todo:
                if stop.requested:
                    counts["not run (stopped)"] = counts.get("not run (stopped)", 0) + 1
                    continue
                lay = case.layer
                bar.set_postfix_str(f"{case.kernel} {lay.net}:{lay.name} "
                                    f"S={case.sparsity:g}", refresh=False)
                m = Measurement.of(case, runner.run(case), run_id, fp_hash, machine_hash,
                                   node=node)
                store.add(m)
                counts[m.status.value] = counts.get(m.status.value, 0) + 1
                bar.update(1)
    except BaseException:
        runner.abandon()
        raise
    finally:
        bar.close()
        runner.close()
    return counts


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
