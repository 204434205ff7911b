"""Other work on the machine while a round is timed, measured rather than guessed.

Per round: the CPU time the whole machine used (``/proc/stat``: every busy state, steal
included, since a hypervisor's other guests take cores too), minus what this process used
(``os.times``: every thread, and children it waited for), over the round's wall time: the
share of cores other work held. The worker threads' run-queue wait
(``/proc/self/task/*/schedstat``, second field) says how long our own threads were ready but
not running. Rounds are judged in windows of at least ``WINDOW`` seconds (the counters tick
every 10 ms); a window is contended where other work held more than ``MAX_SHARE`` of a core
and our threads, summed, waited for a CPU more than ``MAX_WAIT`` of the window (on a run queue,
or stolen by the hypervisor: steal time counts as waiting): other work that ran only on cores
our threads left idle (a timing process runs ahead of it at a raised priority,
``timing.raise_priority``) took no CPU time from the measurement. What it can still take,
through a shared cache, memory bandwidth or an SMT sibling, no counter here shows; the
interleaved rounds and the plausibility checks are what catch that. Measured on a 2-core EPYC with one
core kept busy by another process, 2-thread cases: at nice 0 other work held 0.66 of a core
and our threads waited 0.66 of the time on average; at nice -20 other work still held up to
0.32 of a core in single-threaded stretches, and our threads waited at most 0.046 of the time
(0.037 on the idle machine). A contended window is retaken after a short back-off, at most
``RETAKES`` times and within a time ``Budget`` per process; one that stays contended is kept
and the row flagged with the share measured. Where ``/proc`` is not there, nothing is
measured (share 0); where the threads' wait cannot be read, the share alone decides."""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass

from .records import default_max_contention

MAX_SHARE = 0.25  # of one core: more than this, and the round is retaken ...
MAX_WAIT = 0.1  # ... if our threads also waited for a CPU more than this share of the time
RETAKES = 3  # per round
BACKOFF = 0.2  # seconds before the first retake, doubled for each further one


class ProcReader:
    """Cumulative readings: machine busy CPU seconds, the hypervisor's steal seconds (both
    from one read of ``/proc/stat``, in ``machine_busy``), this process's CPU seconds, our
    threads' run-queue wait seconds."""

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._steal = 0.0

    def machine_busy(self) -> float | None:
        try:
            with open("/proc/stat") as f:
                v = [int(c) for c in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        self._steal = v[7] / self.tick if len(v) > 7 else 0.0
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        guest = sum(v[8:10]) if len(v) > 9 else 0  # already counted in user and nice
        return (sum(v) - idle - guest) / self.tick

    def steal(self) -> float:
        """CPU seconds the hypervisor gave other guests while this machine's CPUs wanted to
        run (time our threads lost that no run queue of ours shows), as of the last
        ``machine_busy``."""
        return self._steal

    def own_cpu(self) -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def runq_wait(self) -> float | None:
        """Our threads' run-queue wait, summed; None where it cannot be read (no schedstat,
        or a kernel without scheduler statistics, where every run time reads 0)."""
        total, ran = 0, 0
        for f in glob.glob("/proc/self/task/*/schedstat"):
            try:
                with open(f) as fh:
                    cols = fh.read().split()
                total += int(cols[1])
                ran += int(cols[0])
            except (OSError, IndexError, ValueError):
                continue
        return total / 1e9 if ran > 0 else None


@dataclass
class Reading:
    wall: float
    busy: float | None
    own: float
    wait: float | None
    steal: float


class Monitor:
    """``start()`` then ``stop()`` around a round: (other work's share of cores, our threads'
    wait for a CPU over wall time, summed over the threads: run-queue wait plus the machine's
    steal time; None where the run-queue wait cannot be read)."""

    def __init__(self, reader=None, clock=time.perf_counter):
        self.reader = reader or ProcReader()
        self.clock = clock
        self._start: Reading | None = None

    def _read(self) -> Reading:
        r = self.reader
        busy = r.machine_busy()  # reads steal too
        return Reading(self.clock(), busy, r.own_cpu(), r.runq_wait(), r.steal())

    def start(self) -> None:
        self._start = self._read()

    def elapsed(self) -> float:
        return self.clock() - self._start.wall

    def stop(self) -> tuple[float, float | None]:
        a, b = self._start, self._read()
        wall = max(b.wall - a.wall, 1e-9)
        # time stolen by the hypervisor is time our threads waited too, on no run queue of ours
        stolen = max(b.steal - a.steal, 0.0) / wall
        wait = None if a.wait is None or b.wait is None else \
            max(b.wait - a.wait, 0.0) / wall + stolen
        if a.busy is None or b.busy is None:
            return 0.0, wait
        other = (b.busy - a.busy) - (b.own - a.own)
        return max(other, 0.0) / wall, wait


@dataclass
class Contention:
    """What a timing saw: the largest other-work share among the rounds kept, how many rounds
    were retaken, and whether a kept round was still over the limit."""

    share: float = 0.0
    runq: float | None = None  # the largest wait for a CPU of a kept window; None: unreadable
    retaken: int = 0
    contended: bool = False


# /proc/stat and os.times count in ticks (10 ms): over a few milliseconds the share they give
# is off by whole cores (measured: 157 rounds of an idle quick sweep retaken, at up to 1.35
# cores "other work", when each round was judged on its own). Rounds are judged together,
# over windows of at least this many seconds, and a contended window is retaken whole.
WINDOW = 0.25


@dataclass
class Budget:
    """Retakes cost time; a machine that stays busy would have every window retaken. Over a
    process (a worker's whole sweep), retaken windows and their back-offs may take at most
    ``share`` of the time of the windows kept, plus ``allowance`` seconds: past that a
    contended window is kept and flagged at once, so a busy machine costs a bounded share more
    time, not a multiple."""

    share: float = 0.5
    allowance: float = 2.0
    kept: float = 0.0
    retaken: float = 0.0

    def allows(self) -> bool:
        return self.retaken < self.share * self.kept + self.allowance


BUDGET = Budget()  # this process's


def contended(share: float, wait: float | None, max_share: float = MAX_SHARE,
              max_wait: float = MAX_WAIT) -> bool:
    """Other work held more than ``max_share`` of a core, and took it from our threads: they
    waited for a CPU more than ``max_wait`` of the time (unknown wait: the share decides)."""
    return share > max_share and (wait is None or wait > max_wait)


def rounds(take_round, n: int, monitor: Monitor | None = None, max_share: float = MAX_SHARE,
           retakes: int = RETAKES, backoff: float = BACKOFF, sleep=time.sleep,
           stop_early=None, window: float = WINDOW, budget: Budget | None = None,
           max_wait: float = MAX_WAIT) -> Contention:
    """Call ``take_round()`` for ``n`` rounds; it times one round and returns a function that
    drops that round's samples (and every later one's). Rounds are judged over windows of at
    least ``window`` seconds: a window in which other work held more than ``max_share`` of a
    core while our threads waited for a CPU more than ``max_wait`` of it (``contended``) is
    dropped and retaken after ``backoff`` (doubled each time), at most ``retakes``
    times in a row; then it is kept and flagged. ``stop_early(done)`` ends the rounds early
    (a deadline); a last window too short to judge is kept unjudged. ``budget`` bounds the
    time all retakes of the process take (``Budget``; default this process's)."""
    mon = monitor or Monitor()
    budget = budget if budget is not None else BUDGET
    seen = Contention()
    done, attempt, pending = 0, 0, []
    mon.start()
    while done < n:
        pending.append(take_round())
        done += 1
        last = done == n or (stop_early is not None and stop_early(done))
        if mon.elapsed() < window:
            if not last:
                continue
            break  # too short to judge: kept as it is
        took = mon.elapsed()
        share, runq = mon.stop()
        busy = contended(share, runq, max_share, max_wait)
        if busy and attempt < retakes and budget.allows():
            pending[0]()  # drops this window's rounds
            done -= len(pending)
            seen.retaken += len(pending)
            pending = []
            budget.retaken += took + backoff * 2 ** attempt
            sleep(backoff * 2 ** attempt)
            attempt += 1
            mon.start()
            continue
        budget.kept += took
        seen.contended |= busy
        seen.share = max(seen.share, share)
        if runq is not None:
            seen.runq = runq if seen.runq is None else max(seen.runq, runq)
        attempt, pending = 0, []
        if last:
            break
        mon.start()
    return seen


def busiest_others(n: int = 3) -> list[str]:
    """The processes other than ours using the most CPU right now (psutil, over 0.2 s), as
    'name (pid) NN%'; empty where psutil is not installed."""
    try:
        import psutil
    except ImportError:
        return []
    me = {os.getpid(), os.getppid()}
    procs = []
    for p in psutil.process_iter(["pid", "name"]):
        if p.info["pid"] in me:
            continue
        try:
            p.cpu_percent(None)
            procs.append(p)
        except psutil.Error:
            continue
    time.sleep(0.2)
    use = []
    for p in procs:
        try:
            use.append((p.cpu_percent(None), p.info["name"], p.info["pid"]))
        except psutil.Error:
            continue
    return [f"{name} ({pid}) {pct:.0f}%" for pct, name, pid in sorted(use, reverse=True)[:n]
            if pct >= 5]


def busy_now(seconds: float = 0.5, max_share: float = MAX_SHARE, monitor=None) -> str | None:
    """One warning line where other work holds more than ``max_share`` of a core right now
    (naming the busiest other processes), else None. It never waits for the machine to calm."""
    if monitor is None and default_max_contention() is None:  # off: nothing acts on it
        return None
    mon = monitor or Monitor()
    mon.start()
    time.sleep(seconds)
    share, _ = mon.stop()
    if share <= max_share:
        return None
    who = busiest_others()
    return (f"warning: other work is using {share:.2f} of a core on this machine"
            + (f" ({', '.join(who)})" if who else "") + "; rounds in which it keeps our "
            "threads waiting for a CPU are retaken or flagged contended "
            "(SPARSECONV_MAX_CONTENTION)")
