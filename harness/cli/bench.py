"""``python -m harness bench``: sweep, measure, store, summarize."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

import kernels
import shapes
from kernels import patterns as P

from .. import UsageError, analysis, cases, confirm, contention, drivers, env, execute
from ..records import Device, Status, TimingOptions
from ..store import Store
from .common import (
    add_common,
    add_executor,
    device_of,
    machine_words,
    name_list,
    positive,
    prioritise,
    recorded_sweep,
    shard,
    sparsity_list,
    threads_of,
)


def add_parser(sub):
    p = sub.add_parser("bench", help="sweep layers x sparsities x kernels and store timings")
    add_common(p)
    p.add_argument("--quick", action="store_true",
                   help="a few layers and each kernel's default pattern parameter (a few minutes "
                        "with the confirmation pass)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="skip cases already measured with this fingerprint (default)")
    g.add_argument("--fresh", dest="resume", action="store_false", help="measure everything")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --resume: measure again the cases whose last result is not ok")
    p.add_argument("--shard", default="0/1", help="run the i-th of n slices of the layers")
    p.add_argument("--case-timeout", type=positive(float, 0, strict=True), default=300.0,
                   help="seconds per case")
    p.add_argument("--rounds", type=positive(int, 1), default=7,
                   help="interleaved timing rounds per case")
    p.add_argument("--min-sample", type=positive(float, 0), default=2e-3,
                   help="seconds per timing sample")
    p.add_argument("--confirm", action=argparse.BooleanOptionalAction, default=True,
                   help="end with the confirmation pass: per layer, pattern and sparsity, the "
                        "best and runner-up configurations race dense once more, and the raced "
                        "figures feed the best figures (default; --no-confirm skips it)")
    p.add_argument("--no-progress", action="store_true")
    add_executor(p)
    p.set_defaults(func=run)


def plan(args):
    """Validate arguments and build the case list (raises UsageError with one sentence).
    Returns ``(cases, device, threads, notes)``: ``notes`` are lines to print first; no cases
    means an empty shard (the one note says so)."""
    if args.retry_failed and not args.resume:
        raise UsageError("--retry-failed re-measures the failed cases of a resumed sweep and "
                         "--fresh measures every case again: give one of them")
    nets = name_list(args.nets, shapes.NETS, "net") if args.nets else []
    sparsities = sparsity_list(args.sparsities)
    device = device_of(args)
    threads = threads_of(args)
    valid_k = kernels.names(device=device.kernel_device)
    if args.kernels:
        knames = name_list(args.kernels, kernels.names(), "kernel")
        wrong = [k for k in knames if kernels.get(k).device != device.kernel_device]
        if wrong:
            raise UsageError(f"kernel(s) {', '.join(wrong)} do not run on --device "
                             f"{args.device}; valid: {', '.join(valid_k)}")
    else:
        knames = valid_k
    pats = name_list(args.patterns, P.names(), "pattern") if args.patterns else None
    if pats:
        have = {kernels.get(k).pattern for k in knames} - {"dense"}
        lacking = [pat for pat in pats if pat not in have]
        if lacking:
            among = "among --kernels " if args.kernels else ""
            raise UsageError(f"no {device.kernel_device} kernel {among}implements pattern(s) "
                             f"{', '.join(lacking)}, so only dense would be measured; patterns "
                             f"with a kernel: {', '.join(sorted(have)) or 'none'}")
    if args.shapes_csv and not Path(args.shapes_csv).is_file():
        raise UsageError(f"--shapes-csv {args.shapes_csv!r} does not exist")
    notes: list[str] = []
    try:
        layers = cases.select_layers(nets, args.layers.split(",") if args.layers else None,
                                     quick=getattr(args, "quick", False),
                                     shapes_csv=args.shapes_csv, notes=notes)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not layers:
        raise UsageError("no layers to measure: --nets is empty and no --shapes-csv is given")
    i, n = shard(getattr(args, "shard", "0/1"))
    mine = [lay for j, lay in enumerate(layers) if j % n == i]
    if not mine:
        return [], device, threads, [f"bench: shard {i}/{n} holds none of the {len(layers)} "
                                     f"layer(s); nothing to measure"]
    return cases.build(mine, sparsities, knames, args.batch, args.dtype, device, threads,
                       quick=getattr(args, "quick", False), patterns=pats), device, threads, notes


def summary(df: pd.DataFrame, requested: dict[str, int]) -> pd.DataFrame:
    """Network-level speedups, layers covered out of the ``requested`` layers of each net; a
    net some of whose layers have no dense baseline (a stopped sweep) gets no network
    figure."""
    net = analysis.network_table(df)
    if net.empty:
        return net
    out = net[["net", "pattern", "sparsity", "covered", "layers", "speedup", "kernel_speedup",
               "dense_ms", "sparse_ms"]].copy()
    want = out["net"].map(requested).fillna(out["layers"]).astype(int)
    partial = out["layers"] < want
    for col in ("speedup", "kernel_speedup", "dense_ms", "sparse_ms"):
        out[col] = out[col].round(3).astype(object).where(~partial, "-")
    out["covered"] = out["covered"].astype(str) + "/" + want.astype(str)
    return out.drop(columns="layers").rename(columns={
        "speedup": "net speedup e2e", "kernel_speedup": "net speedup kernel",
        "covered": "layers covered"}).round(3)


def run(args) -> int:
    t0 = time.time()
    todo, device, threads, notes = plan(args)
    for note in notes:
        print(note)
    if not todo:  # an empty shard
        return 0
    execute.check(args.executor, args.ray_address)
    busy = contention.busy_now() if not device.interpreted else None
    store = Store(args.db)
    fp = dict(env.fingerprint())
    fph, mh = env.identity_hash(fp), env.machine_hash(fp)
    priority = prioritise(fp, device)
    fp["peak_gflops"] = round(env.measured_peak_gflops(threads, device.tensor_device), 1)
    run_id = store.start_run(fp, fph, mh, {k: v for k, v in vars(args).items() if k != "func"})
    where = machine_words(fp, device, threads) if device is Device.CUDA else \
        f"{fp['cpu']} ({fp['cores']} cores, {', '.join(fp['cpu_isa']) or 'no SIMD flags'}), " \
        f"{threads} threads"
    print(f"bench: {len(todo)} cases on {where}, batch {args.batch}, {args.dtype}, "
          f"device {device}; db {args.db}")
    if priority:
        print(priority)
    if busy:
        print(busy, flush=True)
    if device.interpreted:
        print("device cuda-interpret: the GPU kernels run through Triton's interpreter on the "
              "CPU; its timings check the pipeline and are not GPU timings")
    timing = TimingOptions(rounds=args.rounds, min_sample=args.min_sample)
    byk = {c.key: c for c in todo}
    confirmed = {}

    def sweep_and_confirm():
        with execute.make(args.executor, timing, args.case_timeout, address=args.ray_address,
                          gpus=device is Device.CUDA) as ex:
            counts = drivers.sweep(ex, todo, store, run_id, resume=args.resume,
                                   retry_failed=args.retry_failed,
                                   progress=not args.no_progress,
                                   desc="bench (ray)" if ex.multinode else "bench")
            if args.confirm and not counts.get(drivers.NOT_RUN) and not device.interpreted:
                # each slot is raced on a node of the machine kind its rows were measured
                # on (confirm.run declines it on the others), so a cluster of several kinds
                # confirms every kind's rows where they were measured
                kinds = {info.identity for info in ex.infos()}
                df = store.measurements(fp_hash=None)
                df = df[df.fp_hash.isin(kinds) & df.case_key.isin(byk)]
                confirmed.update(confirm.run(df, byk, store, run_id, timing, ex,
                                             case_timeout=args.case_timeout,
                                             progress=not args.no_progress))
        return counts

    counts = recorded_sweep(store, run_id, sweep_and_confirm)
    print("\ncases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    line = confirm.summary(confirmed)
    if line:
        print(line)
    df = store.measurements(fp_hash=None if args.executor == "ray" else fph)
    df = df[df.case_key.isin(byk)]
    requested = {}
    for c in todo:
        requested.setdefault(c.layer.net, set()).add(c.layer.name)
    requested = {net: len(names) for net, names in requested.items()}
    s = summary(df, requested) if not device.interpreted else pd.DataFrame()
    if not s.empty:
        print("\nNetwork-level speedup against the best dense layout (batch "
              f"{args.batch}, {args.dtype}, {machine_words(fp, device, threads)}):")
        with pd.option_context("display.width", 200, "display.max_rows", None):
            print(s.to_string(index=False))
    line = analysis.trust_summary(df)
    if line and not device.interpreted:
        print("\n" + line)
    bad = df[df.status.map(lambda st: Status(st).failed)]
    if len(bad):
        print(f"\n{len(bad)} case(s) failed; see the report or `python -m harness export`:")
        for _, r in bad.head(10).iterrows():
            print(f"  {r.status}: {r.kernel} {r.net}:{r.layer} S={r.sparsity:g}: {r.reason}")
    stopped = counts.get("not run (stopped)", 0)
    if stopped:
        print(f"\nbench stopped (Ctrl-C) after {time.time() - t0:.0f} s: {stopped} of "
              f"{len(todo)} case(s) not run, so layers without a dense baseline have no network "
              f"figure; run the same command again (without --fresh) to measure the rest; "
              f"results in {args.db}")
        return 130
    if confirmed.get("not raced (stopped)"):
        print(f"\nbench stopped (Ctrl-C) in its confirmation pass after {time.time() - t0:.0f} "
              f"s: the slots not raced keep their sweep figures, marked unconfirmed; results "
              f"in {args.db}")
        return 130
    print(f"\nbench finished in {time.time() - t0:.0f} s; results in {args.db}")
    return 0
