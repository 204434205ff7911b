"""The worker process's serving loop: it receives a typed request of :mod:`harness.records`
and replies with its typed result, in a process of its own so a case that hangs or crashes can
be killed without losing the sweep. What each request does lives elsewhere: a case, a race and
a kernel set-up in :mod:`harness.measure`, a whole network in :mod:`harness.e2e`."""

from __future__ import annotations

import os
import sys
import traceback

from . import e2e, measure
from .errors import error_text
from .records import (
    CaseRequest,
    E2ERequest,
    InitRequest,
    RaceRequest,
    StopRequest,
    WorkerFailure,
    WorkerReady,
)

HANDLERS = {InitRequest: measure.init, CaseRequest: measure.execute, RaceRequest: measure.race,
            E2ERequest: e2e.run_e2e}


def serve(conn, parent_pid: int | None = None) -> None:
    """Worker loop: receive a request, reply with its typed result; ``StopRequest`` ends it.
    The process ends itself when ``parent_pid`` (the runner that started it) dies."""
    import signal

    from .interrupts import follow_parent
    from .timing import prepare_process

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner decides when to stop
    prepare_process()  # one allocator regime, ahead of other work (see harness.timing)
    if parent_pid is not None:
        follow_parent(parent_pid)
    conn.send(WorkerReady(os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if isinstance(msg, StopRequest):  # nothing left to save: skip the interpreter's
            conn.close()  # teardown of torch, a second or more the runner waits on
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        try:
            conn.send(HANDLERS[type(msg)](msg))
        except Exception as e:  # noqa: BLE001
            conn.send(WorkerFailure("worker: " + error_text(e), traceback.format_exc()[-2000:]))
