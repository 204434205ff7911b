"""Helpers shared by the command modules: option types that validate, name lists, the device
choice. Only the command modules import this package; the engine never does."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd

import kernels
import shapes

from .. import UsageError, cases
from ..interrupts import by_sigterm
from ..records import Device, RunStatus

DEFAULT_DB = Path(os.environ.get("SPARSECONV_RESULTS", "results/results.sqlite"))


def recorded_sweep(store, run_id: int, sweep) -> dict:
    """Run ``sweep()`` (returns counts by status) and record how the run ended: finished,
    stopped (Ctrl-C between cases, or SIGTERM), aborted (a second Ctrl-C) or failed."""
    status = RunStatus.FAILED
    try:
        counts = sweep()
        status = RunStatus.STOPPED if counts.get("not run (stopped)") else RunStatus.FINISHED
        return counts
    except KeyboardInterrupt as e:  # SIGTERM: stopped; a second Ctrl-C: aborted
        status = RunStatus.STOPPED if by_sigterm(e) else RunStatus.ABORTED
        raise
    finally:
        store.finish_run(run_id, status)


def sparsity_list(text: str) -> list[float]:
    out = []
    for t in text.split(","):
        t = t.strip()
        if not t:
            continue
        try:
            v = float(t)
        except ValueError:
            raise UsageError(
                f"sparsity {t!r} is not a number; e.g. --sparsities 0.5,0.9375") from None
        if not 0 < v < 1:
            raise UsageError(f"sparsity {v:g} is outside (0, 1); e.g. 0.5, 0.75, 0.875, 0.9375")
        out.append(v)
    if not out:
        raise UsageError("--sparsities is empty")
    return out


def name_list(text, valid, what):
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in valid]
    if bad:
        raise UsageError(f"unknown {what} {', '.join(map(repr, bad))}; valid: {', '.join(valid)}")
    return names


def shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r} must look like i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text}: need 0 <= i < n")
    return i, n


def positive(kind, minimum, strict=False):
    """argparse type: a number >= minimum (> minimum with ``strict``), else one clear line."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not v == v or (v <= minimum if strict else v < minimum):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {minimum:g}, got {text}")
        return v
    parse.__name__ = kind.__name__
    return parse


def threads_of(args) -> int:
    """``--threads``, or every core of this machine. More threads than cores measures the
    contention, not the kernel: refused unless ``--force-threads`` (or on Ray, whose nodes
    have their own cores)."""
    cores = os.cpu_count() or 1
    if args.threads is None:
        return cores
    if (args.threads > cores and not getattr(args, "force_threads", False)
            and getattr(args, "executor", "local") != "ray"):
        raise UsageError(f"--threads {args.threads}: this machine has {cores} cores; more threads "
                         f"than cores time the contention, not the kernel (add --force-threads "
                         f"to measure anyway)")
    return args.threads


def add_threads(p) -> None:
    p.add_argument("--threads", type=positive(int, 1), default=None,
                   help="CPU threads (default: all cores of this machine)")
    p.add_argument("--force-threads", action="store_true",
                   help="allow --threads beyond this machine's cores")


def device_of(args) -> Device:
    """The device from ``--device`` and ``--interpret``; a CUDA run needs CUDA or the flag."""
    if args.device == "cpu":
        if getattr(args, "interpret", False):
            raise UsageError("--interpret runs the GPU kernels through Triton's interpreter: "
                             "use it with --device cuda")
        return Device.CPU
    if getattr(args, "interpret", False):
        os.environ["TRITON_INTERPRET"] = "1"  # before the Triton kernels are first imported
        return Device.CUDA_INTERPRET
    import torch

    if not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device on this machine; add --interpret to run "
                         "the GPU kernels through Triton's interpreter on the CPU (a pipeline "
                         "check, not a timing)")
    return Device.CUDA


def machine_words(fp: dict, device: Device, threads: int) -> str:
    """What a run's figures were measured on, for its header: the GPU on ``cuda``, the CPU and
    its threads otherwise."""
    if device is Device.CUDA:
        return f"{fp.get('gpu') or 'a CUDA GPU'} (driver {fp.get('gpu_driver')}), host {fp['cpu']}"
    return f"{fp['cpu']}, {threads} threads"


def prioritise(fp: dict, device: Device) -> str | None:
    """Raise this process's scheduling priority for timing (``timing.raise_priority``; the
    workers it starts inherit it and ask again themselves; on a cluster each node's workers
    ask for their own), record the niceness in the run's fingerprint (``nice``; not part of
    its identity), and return the words for the header. Not under Triton's interpreter, which
    times nothing that counts: a long CPU-heavy run that should not outrank the desktop."""
    from .. import timing

    try:
        asked = timing.wanted_nice()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if device.interpreted:
        fp["nice"] = os.nice(0)
        return None
    fp["nice"] = nice = timing.raise_priority(asked) if asked is not None else os.nice(0)
    return timing.priority_words(nice, asked)


def add_common(p, defaults_nets="resnet50,vgg19"):
    p.add_argument("--nets", default=defaults_nets, help=f"comma list of {', '.join(shapes.NETS)}")
    p.add_argument("--layers", help="comma list of layer names (or catalog indices)")
    p.add_argument("--shapes-csv", help="extra user-supplied shapes (CSV with ConvLayer fields)")
    p.add_argument("--sparsities", default=",".join(map(str, cases.SPARSITIES)))
    p.add_argument("--kernels", help="comma list of kernels (default: all for --device)")
    p.add_argument("--patterns", help="comma list of patterns (default: all)")
    p.add_argument("--batch", type=positive(int, 1), default=1)
    p.add_argument("--dtype", default="float32", choices=list(kernels.DTYPES))
    add_threads(p)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--interpret", action="store_true",
                   help="with --device cuda: run the GPU kernels through Triton's interpreter "
                        "on CPU tensors (a pipeline check without a GPU; rows are stored as "
                        "device cuda-interpret and never shown as GPU speedups)")
    p.add_argument("--db", default=str(DEFAULT_DB), help="results database (SQLite)")




def add_executor(p) -> None:
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where cases run: this machine, or the nodes of a Ray cluster (each node "
                        "runs one layer's whole group of cases at a time)")
    p.add_argument("--ray-address", default=None,
                   help="with --executor ray: the cluster to join (default: start a local Ray)")


def interval(lo, hi) -> str:
    """'lo-hi' of a 95% interval, '-' where there is none (fewer than 5 rounds)."""
    return f"{lo:.2f}-{hi:.2f}" if pd.notna(lo) and pd.notna(hi) else "-"


def interval_column(df: pd.DataFrame, col: str = "speedup") -> pd.Series:
    """``interval`` of each row's ``col`` (its ``col_lo`` and ``col_hi`` columns)."""
    if f"{col}_lo" not in df:
        return pd.Series("-", index=df.index)
    return pd.Series([interval(lo, hi) for lo, hi in zip(df[f"{col}_lo"], df[f"{col}_hi"])],
                     index=df.index)
