"""How a command stops, written once for every loop that runs cases (the local sweep, the Ray
dispatch loop, e2e, autotune, ``table --plan``).

- Ctrl-C (SIGINT), first: the case in flight finishes, nothing new starts (``Stop``); second:
  ``KeyboardInterrupt`` at once. The command exits 130.
- SIGTERM (``timeout``, ``kill``, a batch scheduler): ``Terminated`` is raised where the command
  is; the case in flight is abandoned (its worker killed), the run is recorded ``stopped`` and
  the command exits 143 (128 + 15).
- A worker process ends itself when the process that started it dies (``follow_parent``), so
  no measurement keeps a core busy after its command is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: stop now, like a second Ctrl-C, but the run counts as stopped."""


EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


_active = False  # inside handled(): SIGTERM is ours
_received = False  # SIGTERM arrived during this command


def _on_sigterm(signum, frame):
    global _received
    _received = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not cut the cleanup
    raise Terminated()


def by_sigterm(exc: BaseException) -> bool:
    """Whether ``exc`` ends the command because of SIGTERM: ``Terminated`` itself, or the
    plain KeyboardInterrupt a library raised in its place (Ray turns any exception from a
    signal handler that runs inside its calls into KeyboardInterrupt)."""
    return isinstance(exc, Terminated) or (_received and isinstance(exc, KeyboardInterrupt))


@contextlib.contextmanager
def handled():
    """For the length of a command, in the main thread: SIGTERM raises ``Terminated``; a
    file-size limit makes a write fail (an error SQLite and Python report) instead of killing
    the process. The previous handlers are restored after."""
    global _active, _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = {signal.SIGTERM: _on_sigterm}
    if hasattr(signal, "SIGXFSZ"):
        wanted[signal.SIGXFSZ] = signal.SIG_IGN
    old = {sig: signal.signal(sig, handler) for sig, handler in wanted.items()}
    _active, _received = True, False
    try:
        yield
    finally:
        _active = False
        for sig, handler in old.items():
            signal.signal(sig, handler)


def reclaim() -> None:
    """Take SIGTERM back after a library installed its own handler (Ray's core worker aborts
    the process on SIGTERM)."""
    if _active and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


class Stop:
    """First Ctrl-C: finish the case in flight, then stop (``requested``). Second: abort now."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after the case in flight (Ctrl-C again to abort now)", file=sys.stderr)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


PR_SET_PDEATHSIG = 1


def follow_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """End this process when ``parent_pid`` (the process that started it) dies: on Linux the
    kernel sends SIGKILL at once (PR_SET_PDEATHSIG); everywhere a watchdog thread checks the
    parent every ``poll_s`` seconds (it also covers a parent that died before this ran)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="follow-parent", daemon=True).start()
