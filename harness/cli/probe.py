"""``python -m harness probe``: the ceiling of the CS CPU kernel's inner loop on this machine.

The loop alone (an int32 offset, one broadcast weight, T vector loads feeding T FMAs: the body
of ``cs_offsets``) runs over a private working set per thread, at working-set sizes from L1 to
beyond L2, with every load aligned or (as a tap's window usually is) straddling two cache
lines. Each figure is set against the dense fp32 GEMM measured in the same run: at sparsity S a
kernel whose every FMA ran at the loop's rate, with nothing else costing anything, would beat
dense by at most ``1/(1-S) x dense time per FMA / loop time per FMA``. Rounds are interleaved;
medians are printed. No layer is timed: this says what the hardware allows, ``table --plan``
says what the kernels reach."""

from __future__ import annotations

import os
import statistics

import pandas as pd

from .. import UsageError, env
from ..records import Device
from .common import positive, prioritise

SIZES_KB = (16, 96, 512, 4096)
MAX_KB = 1 << 20  # 1 GiB per thread
MAX_FMAS = 10**11


def add_parser(sub):
    p = sub.add_parser("probe", help="the CS CPU inner loop's ceiling on this machine against "
                                     "dense GEMM (no layer is timed)")
    p.add_argument("--sizes", default=",".join(map(str, SIZES_KB)),
                   help="working sets per thread, KiB (comma list)")
    p.add_argument("--tiles", default="4,6", help="vectors per pixel tile T (comma list)")
    p.add_argument("--threads", type=positive(int, 1), default=None,
                   help="threads (default: all cores of this machine)")
    p.add_argument("--sparsity", type=float, default=0.9375,
                   help="for the ceiling column: the kept fraction is 1 - sparsity")
    p.add_argument("--rounds", type=positive(int, 1), default=5)
    p.add_argument("--fmas", type=positive(int, 1), default=20_000_000,
                   help="vector FMAs per thread per measurement")
    p.set_defaults(func=run)


def _ints(text: str, what: str, allowed=None) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{what}: a comma list of integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise UsageError(f"{what}: positive integers, got {text!r}")
    bad = [v for v in vals if allowed and v not in allowed]
    if bad:
        raise UsageError(f"{what}: {bad[0]} is not one of {', '.join(map(str, allowed))}")
    return vals


def run(args) -> int:
    from kernels import _ext
    from kernels.registry import KernelBuildError

    sizes = _ints(args.sizes, "--sizes")
    if max(sizes) > MAX_KB:
        raise UsageError(f"--sizes: at most {MAX_KB} KiB (1 GiB) per thread, got {max(sizes)}")
    if args.fmas > MAX_FMAS:
        raise UsageError(f"--fmas: at most {MAX_FMAS:.0e}, got {args.fmas}")
    tiles = _ints(args.tiles, "--tiles", (1, 2, 3, 4, 6, 8))
    if not 0 <= args.sparsity < 1:
        raise UsageError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    cores = os.cpu_count() or 1
    if args.threads and args.threads > cores:
        raise UsageError(f"--threads: this machine has {cores} cores, got {args.threads}")
    threads = args.threads or cores
    try:
        _ext.PROBE.load()
        vw, isa = _ext.vector_width(), _ext.isa()
    except KernelBuildError as e:
        raise UsageError(str(e)) from None
    fp = dict(env.fingerprint())
    priority = prioritise(fp, Device.CPU)
    hz = _hz(fp.get("cpu_hz", ""))
    print(f"probe: the CS inner loop on {fp['cpu']}, {threads} thread(s), {isa} "
          f"({vw} lanes), {args.rounds} interleaved rounds, {args.fmas:,} vector FMAs per "
          f"thread per measurement\n{priority}", flush=True)
    rows = [(kb, t, shift) for kb in sizes for t in tiles for shift in (0, 1)]
    loop = {r: [] for r in rows}
    dense = []
    for _ in range(args.rounds):
        dense.append(env.measured_peak_gflops(threads))
        for kb, t, shift in rows:
            try:
                s = _ext.loop_probe(t, shift, kb * 1024, threads, args.fmas)
            except RuntimeError as e:  # e.g. not enough memory for the working sets
                raise UsageError(str(e).strip().splitlines()[0]) from None
            loop[(kb, t, shift)].append(s / args.fmas * 1e9)
    gflops = statistics.median(dense)
    flops = 2 * vw  # per vector FMA
    dense_ns = threads * flops / gflops  # one thread's time per vector FMA inside the GEMM
    keep = 1 - args.sparsity
    table = []
    for (kb, t, shift), ns in loop.items():
        med = statistics.median(ns)
        table.append({
            "working set KiB": kb, "T": t, "loads": "straddling" if shift else "aligned",
            "ns/FMA": round(med, 3),
            "cycles/FMA": round(med * hz, 2) if hz else None,
            "x dense GEMM rate": round(dense_ns / med, 2),
            f"ceiling x at {args.sparsity:g}": round(dense_ns / med / keep, 2)})
    df = pd.DataFrame(table)
    if not hz:
        df = df.drop(columns="cycles/FMA")
    with pd.option_context("display.width", 200, "display.max_rows", None):
        print(df.to_string(index=False))
    clock = f" ({dense_ns * hz:.2f} cycles at the nominal {hz:.2f} GHz)" if hz else ""
    print(f"dense fp32 GEMM in the same run: {gflops:.0f} GFLOP/s on {threads} thread(s) = "
          f"{dense_ns:.3f} ns per vector FMA per thread{clock}")
    print("ceiling: 1/(1-S) x dense ns per FMA / loop ns per FMA; a kernel also pays for its "
          "epilogue, partial tiles and the grid's discarded columns")
    return 0


def _hz(text: str) -> float | None:
    """GHz from py-cpuinfo's advertised clock ('2.5961 GHz'), or None."""
    try:
        val, unit = text.split()
        return float(val) * {"GHz": 1.0, "MHz": 1e-3}[unit]
    except (ValueError, KeyError):
        return None
