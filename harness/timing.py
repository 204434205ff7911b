"""Rigorous timing: calibrated repetitions, interleaved rounds, raw samples, robust statistics.

CPU: ``time.perf_counter`` around ``reps`` calls; one sample = elapsed / reps. Its overhead
(~0.1 us per reading, measured by ``timer_overhead``) is under 0.01% of the 2 ms minimum sample.
GPU: each variant captured in a CUDA graph where it can be (all or none), so the host's launch
overhead (tens of microseconds for a Triton launch, more than many batch-1 kernels) stays out;
CUDA events around each replay, L2 flushed before it; the GPU is kept busy for a spin-up period
first (an idle GPU runs at a low clock and ramps up over tens of milliseconds: measured on an
H100, the first case after a CPU-side check ran 5-10x slow for its first rounds); median.
Variants compared are interleaved (A B C A B C ...) so drift hits all of them alike.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from . import contention
from .records import Device, TimingMode, TimingOptions

NOISY_IQR = 0.10  # IQR / median above this flags a measurement as noisy


@dataclass
class Stats:
    median: float
    iqr: float
    min: float
    max: float
    mean: float
    rounds: int
    reps: int
    noisy: bool

    def as_dict(self):
        return asdict(self)


@dataclass
class Timings:
    """What an interleaved timing returns: per variant its ``Stats`` and raw samples, the clock
    that took them (``TimingMode``) and, where graphs were asked for and not used, why. It
    unpacks as ``stats, samples``."""

    stats: dict
    samples: dict
    mode: TimingMode
    note: str | None = None
    cpu_per_wall: dict | None = None  # CPU: per variant, the process's CPU time over wall time
    contention: contention.Contention | None = None  # CPU: other work seen while timing

    def __iter__(self):
        return iter((self.stats, self.samples))


def stats(samples: list[float], reps: int = 1) -> Stats:
    s = sorted(samples)
    n = len(s)
    if n == 0:
        raise ValueError("no samples")
    q = statistics.quantiles(s, n=4, method="inclusive") if n >= 2 else [s[0], s[0], s[0]]
    med = statistics.median(s)
    iqr = q[2] - q[0]
    return Stats(median=med, iqr=iqr, min=s[0], max=s[-1], mean=statistics.fmean(s), rounds=n,
                 reps=reps, noisy=bool(med > 0 and iqr / med > NOISY_IQR))


def timer_overhead(n: int = 10000) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        time.perf_counter()
    return (time.perf_counter() - t0) / n


# glibc's malloc hands a freed block above its mmap threshold back to the kernel (munmap, or a
# trim of the heap's top), and the threshold moves with what was freed before: the same
# convolution's output then costs page faults or not depending on the calls before it
# (measured on a 2-core EPYC, 2 threads: resnet50 layer1.0.conv3's dense run page-faulted 1536
# times per call and took 6.0 ms in a fresh process, 0.04 faults and 1.2 ms with fixed
# thresholds). Fixed thresholds keep freed blocks for reuse, as a long-running inference process
# does: every variant is timed in the same allocator regime, whatever ran before it.
MMAP_THRESHOLD = 32 << 20  # glibc's largest
TRIM_THRESHOLD = 1 << 30


def steady_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (``MMAP_THRESHOLD``,
    ``TRIM_THRESHOLD``); False where there is no glibc (nothing changes)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(
        mallopt(m_trim_threshold, TRIM_THRESHOLD))


# Other work on the machine takes cores from a timing: with 2 threads on 2 cores and one core
# kept busy by another process, single rows moved by up to 2.9x and most rounds stayed
# contended through every retake (measured on a 2-core EPYC). At a higher priority the
# scheduler runs our threads ahead of such work: under the same load, nice -20 gave per-layer
# ratios within 14% of the idle machine's (5 resnet50 layers, CS against dense). Linux keeps a
# niceness per thread and a new thread takes its creator's, so the timing processes (the
# worker, an engine timed alone) raise theirs before their thread pools start.
NICE_ENV = "SPARSECONV_NICE"
DEFAULT_NICE = -20


def wanted_nice() -> int | None:
    """``SPARSECONV_NICE``: the niceness timing processes ask for, -20 (the default, the
    highest priority) to -1; 'off' or 0: leave it as started (a priority is only ever raised)."""
    v = os.environ.get(NICE_ENV, "").strip().lower()
    if v in ("off", "0"):
        return None
    why = f"{NICE_ENV} must be a niceness from -20 to -1, or 'off' (0), got {v!r}"
    try:
        n = int(v) if v else DEFAULT_NICE
    except ValueError:
        raise ValueError(why) from None
    if not -20 <= n <= 0:
        raise ValueError(why)
    return n or None


def raise_priority(want: int | None = None, setter=None, getter=None,
                   rlimit: int | None = None) -> int:
    """Ask for niceness ``want`` (default ``wanted_nice()``) for every thread of this process,
    and for the threads it starts later; where that is not allowed (it takes root,
    CAP_SYS_NICE or an RLIMIT_NICE that permits it), the lowest niceness the limit allows, if
    lower than now. Returns the niceness of this thread afterwards. Never raises the niceness
    (never lowers priority). ``setter(tid, n)``, ``getter(tid)`` (tid 0: this thread) and
    ``rlimit`` stand in for the system's in tests."""
    want = wanted_nice() if want is None else want
    getter = getter or (lambda tid: os.getpriority(os.PRIO_PROCESS, tid))
    setter = setter or (lambda tid, n: os.setpriority(os.PRIO_PROCESS, tid, n))
    now = getter(0)
    if want is None or want >= now:
        return now
    if rlimit is None:
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NICE)
            if soft != hard:  # an unprivileged process may raise its soft limit to the hard one
                resource.setrlimit(resource.RLIMIT_NICE, (hard, hard))
            rlimit = resource.getrlimit(resource.RLIMIT_NICE)[0]
            if rlimit == resource.RLIM_INFINITY:
                rlimit = 40
        except (ImportError, AttributeError, ValueError, OSError):
            rlimit = 0
    # RLIMIT_NICE's soft limit r lets an unprivileged thread go down to 20 - r
    floor = 20 - rlimit if rlimit > 0 else now
    for n in dict.fromkeys((want, max(want, min(floor, now)))):
        if n >= now:
            continue
        try:
            _renice_all(n, setter, getter)
        except PermissionError:
            continue
        break
    return getter(0)


def _renice_all(n: int, setter, getter) -> None:
    """Niceness ``n`` for this thread (tid 0), then every other thread of the process, again
    until no new thread appears (one started meanwhile by a thread not yet reniced); a thread
    already at ``n`` or below is left as it is."""
    import threading

    setter(0, n)
    me, done = threading.get_native_id(), set()
    while True:
        try:
            tids = {int(t) for t in os.listdir("/proc/self/task")} - {me} - done
        except OSError:
            return
        if not tids:
            return
        for tid in tids:
            try:
                if getter(tid) > n:
                    setter(tid, n)
            except ProcessLookupError:  # a thread that ended meanwhile
                pass
        done |= tids


def prepare_process() -> None:
    """What a process that times does first (the worker, an engine timed alone): glibc's
    thresholds fixed (``steady_allocator``) and its priority raised (``raise_priority``), not
    under Triton's interpreter, which times nothing that counts; a bad ``SPARSECONV_NICE``
    is left to the command that started it to refuse."""
    steady_allocator()
    if os.environ.get("TRITON_INTERPRET") != "1":
        try:
            raise_priority()
        except ValueError:
            pass


def priority_words(nice: int, asked: int | None) -> str:
    """How this process (and the workers it starts) will be scheduled, in words for a header
    line: ``nice`` got, ``asked`` for."""
    if asked is None:
        return f"timed at nice {nice} (not raised: {NICE_ENV}=off)"
    if nice <= asked:
        return f"timed at nice {nice}, ahead of other work at nice 0 ({NICE_ENV})"
    return (f"timed at nice {nice}, not the {asked} asked for: other work at nice {nice} gets "
            f"an equal share of the cores (a higher priority needs root with CAP_SYS_NICE, or "
            f"an RLIMIT_NICE of {20 - asked}: `ulimit -e {20 - asked}` or limits.conf)")


def _time_reps(fn, arg, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(arg)
    return (time.perf_counter() - t0) / reps


def calibrate(fn, arg, min_sample: float, max_reps: int = 10000) -> int:
    """Repetitions per sample so one sample lasts at least ``min_sample`` seconds."""
    if max_reps <= 1:  # nothing to calibrate (the interpreter's single-call rounds)
        return 1
    reps = 1
    while True:
        t = _time_reps(fn, arg, reps) * reps
        if t >= min_sample or reps >= max_reps:
            return reps
        reps = min(max_reps, max(reps * 2, int(reps * min_sample / max(t, 1e-9) * 1.2)))


def warmed_reps(fn, arg, warmup: float, min_sample: float, max_reps: int = 10000) -> int:
    """``fn(arg)`` called for ``warmup`` seconds (at least once), then ``calibrate``'s
    repetitions per sample."""
    t_end = time.perf_counter() + warmup
    fn(arg)
    while time.perf_counter() < t_end:
        fn(arg)
    return calibrate(fn, arg, min_sample, max_reps)


def block(fn, arg, reps: int, settle: bool = True) -> tuple[float, float]:
    """One timed block: (seconds per call over ``reps`` calls, the process's CPU time over
    wall time), after one untimed call where ``settle``."""
    if settle:  # one untimed call: the block starts from this variant's steady state
        fn(arg)
    c0 = time.process_time()
    t = _time_reps(fn, arg, reps)
    return t, (time.process_time() - c0) / max(t * reps, 1e-9)


def interleaved_cpu(variants: dict, rounds: int = 7, min_sample: float = 2e-3,
                    warmup: float = 0.05, deadline: float | None = None, max_reps: int = 10000,
                    gap: float = 0.0, max_contention: float | None = None, monitor=None):
    """Time ``{name: (fn, arg)}`` in interleaved rounds on the host clock: ``Timings``
    (unpacks as ``({name: Stats}, {name: samples})``). ``gap``: seconds of sleep before each
    block, untimed, so thread pools that spin after a call (OpenMP's, an engine's) go idle
    before the next variant runs; each variant's CPU time over wall time is recorded too.
    ``max_contention``: a round taken while other work held more than this share of a core and
    kept our threads waiting for a CPU is retaken, a bounded number of times
    (``harness.contention``); None: rounds are only watched.

    Each timed block follows one untimed call of the same variant, so it measures repeated
    calls of that variant whatever ran before it. Without it, a block's first call ran with
    the previous variant's data in the caches: measured on a 2-core EPYC, resnet50
    layer2.0.conv2's dense convolution (one call per block) ran 10-25% slower right after a
    sparse kernel than right after itself in the same rounds, and a dense run beside a sparse
    case read slower than the same layout's own baseline row. Not under Triton's interpreter
    (``max_reps`` 1), where one call is the whole round."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    reps = {name: warmed_reps(fn, arg, warmup, min_sample, max_reps)
            for name, (fn, arg) in variants.items()}
    samples: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    settle = max_reps > 1 or bool(gap)

    def take_round():
        kept = len(next(iter(samples.values())))
        for name, (fn, arg) in variants.items():
            if gap:  # a pause first, so spinning pools of the variant before go idle
                time.sleep(gap)
            t, c = block(fn, arg, reps[name], settle)
            cpu[name].append(c)
            samples[name].append(t)

        def drop():  # the round is retaken: its samples go, for every variant alike
            for k in samples:
                del samples[k][kept:], cpu[k][kept:]
        return drop

    seen = contention.rounds(
        take_round, rounds, max_share=max_contention if max_contention is not None else
        float("inf"), monitor=monitor,
        stop_early=lambda done: deadline is not None and done >= min(3, rounds)
        and time.perf_counter() > deadline)
    return Timings({k: stats(v, reps[k]) for k, v in samples.items()}, samples, TimingMode.HOST,
                   cpu_per_wall={k: statistics.median(v) for k, v in cpu.items()},
                   contention=seen)


def graphed(fn, arg):
    """``fn(arg)`` captured in a CUDA graph, after warm-up calls on a side stream (as PyTorch
    asks). Returns ``(replay, out)``: a callable that replays it, and the tensor the captured
    call returned (rewritten by every replay)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(arg)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(arg)
    return (lambda _a: graph.replay()), out


def checked_graph(fn, arg, want, tol: float = 1e-3):
    """``graphed(fn, arg)``'s replay, after checking that a replay into a NaN-filled output
    reproduces ``want`` (what the eager call returned, already gated) to ``tol`` in relative
    norm: kernels that add partial sums atomically are not bitwise repeatable."""
    import torch

    from . import gate

    replay, out = graphed(fn, arg)
    if isinstance(want, torch.Tensor) and isinstance(out, torch.Tensor):
        out.fill_(float("nan"))
        replay(arg)
        torch.cuda.synchronize()
        err = gate.relative_error(out, want)
        if not err <= tol:
            raise RuntimeError(f"a replay of the CUDA graph does not reproduce the eager output "
                               f"(relative error {err:.3g})")
    return replay


def interleaved_cuda(variants: dict, rounds: int = 25, warmup: float = 0.1,
                     flush_bytes: int = 256 << 20, spin_up: float = 0.3, graphs: bool = True):
    """GPU: CUDA events around single calls (graph replays unless ``graphs`` is off or a
    variant cannot be captured, which is said on stderr; each graph's replay is checked against
    the variant's eager output first), L2 flushed before each, interleaved rounds."""
    import torch

    flush = torch.empty(flush_bytes // 4, dtype=torch.float32, device="cuda")
    eager, note = {}, None
    for k, (fn, arg) in variants.items():  # first calls: compiles, cuDNN's algorithm search
        out = fn(arg)
        eager[k] = out.clone() if graphs and isinstance(out, torch.Tensor) else None
    torch.cuda.synchronize()
    calls = dict(variants)
    if graphs:
        try:
            captured = {k: checked_graph(fn, arg, eager[k]) for k, (fn, arg) in variants.items()}
        except Exception as e:  # noqa: BLE001 - not capturable or not faithful: all timed eagerly
            note = f"no CUDA graph ({type(e).__name__}: {str(e).strip()[:120]})"
            print(f"timing: {note}: {', '.join(variants)} timed eagerly", file=sys.stderr)
            torch.cuda.synchronize()
        else:
            calls = {k: (replay, variants[k][1]) for k, replay in captured.items()}
    t_end = time.perf_counter() + spin_up
    while time.perf_counter() < t_end:  # keep the GPU busy so its clock is up
        flush.zero_()
        for fn, arg in calls.values():
            fn(arg)
        torch.cuda.synchronize()
    for fn, arg in calls.values():
        t_end = time.perf_counter() + warmup
        fn(arg)
        torch.cuda.synchronize()
        while time.perf_counter() < t_end:
            fn(arg)
            torch.cuda.synchronize()
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for name, (fn, arg) in calls.items():
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(arg)
            end.record()
            torch.cuda.synchronize()
            samples[name].append(start.elapsed_time(end) / 1e3)
    mode = TimingMode.GRAPH if graphs and note is None else TimingMode.EAGER
    return Timings({k: stats(v) for k, v in samples.items()}, samples, mode, note)


def gpu_settings(device: Device) -> None:
    """fp32 fairness on the GPU: cuDNN picks its fastest algorithm, and no TF32 anywhere."""
    if device is Device.CUDA:
        import torch

        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def timed(device: Device, variants: dict, opts: TimingOptions, graphs: bool = True,
          gap: float = 0.0):
    """Interleaved timing on the device's clock (on a GPU, replays of CUDA graphs unless
    ``graphs`` is off). Under the interpreter the CPU clock with few, single-call rounds: a
    pipeline check, not a GPU timing."""
    if device is Device.CUDA:  # a round costs microseconds there: at least 25 of them
        return interleaved_cuda(variants, rounds=max(opts.rounds, 25), graphs=graphs)
    if device is Device.CUDA_INTERPRET:
        return interleaved_cpu(variants, rounds=min(opts.rounds, 3), min_sample=0.0, warmup=0.0,
                               max_reps=1)
    return interleaved_cpu(variants, rounds=opts.rounds, min_sample=opts.min_sample,
                           warmup=opts.warmup, deadline=time.perf_counter() + opts.time_per_case,
                           gap=gap, max_contention=opts.max_contention)


MIN_INTERVAL_ROUNDS = 5  # no interval is claimed from fewer interleaved rounds


def _t_quantile(p: float, df: int) -> float:
    """Student's t quantile (Cornish-Fisher expansion about the normal one; within 0.001 of the
    exact value from 4 degrees of freedom up, which is all an interval of >= 5 rounds needs)."""
    z = statistics.NormalDist().inv_cdf(p)
    v = float(df)
    return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3)
            + (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z)
            / (92160 * v ** 4))


def ratio_interval(num, den, level: float = 0.95, n_boot: int = 2000,
                   seed: int = 0) -> tuple[float | None, float | None]:
    """A bootstrap interval of the ratio ``num / den`` from interleaved sample pairs (round r
    timed both, so drift cancels within a pair): the expanded percentile interval of the mean
    per-round log ratio (Hesterberg 2015), whose tail levels are widened so that it is as wide
    as Student's t interval would be at this many rounds. (None, None) from fewer than
    ``MIN_INTERVAL_ROUNDS`` pairs.

    Not bootstrap-t: with 5 rounds of which one was slowed by other work, the resamples that
    leave that round out have a near-zero spread, their t statistics run into the hundreds, and
    the interval of a 7x difference came out as [0.11, 3e40], read as a tie."""
    import numpy as np

    n = min(len(num) if num is not None else 0, len(den) if den is not None else 0)
    if n < MIN_INTERVAL_ROUNDS:
        return None, None
    r = np.log(np.asarray(num[:n], dtype=float)) - np.log(np.asarray(den[:n], dtype=float))
    if not np.isfinite(r).all():
        return None, None
    means = r[np.random.default_rng(seed).integers(0, n, size=(n_boot, n))].mean(axis=1)
    a = statistics.NormalDist().cdf(-(n / (n - 1)) ** 0.5 * _t_quantile(1 - (1 - level) / 2,
                                                                      n - 1))
    lo, hi = np.quantile(means, [a, 1 - a])
    return float(np.exp(lo)), float(np.exp(hi))


def win_rate(mine, first) -> float | None:
    """The fraction of interleaved rounds (round r timed every variant once) in which ``mine``
    took less time than ``first``."""
    n = min(len(mine or ()), len(first or ()))
    return sum(a < b for a, b in zip(mine[:n], first[:n])) / n if n else None
