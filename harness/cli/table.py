"""``python -m harness table``: per-layer speedups (end-to-end and kernel-only) from the store,
best configuration per kernel, with geometric means over the unique non-stem shapes."""

from __future__ import annotations

import sys
import time

import pandas as pd

import kernels
import shapes

from .. import UsageError, analysis, baseline, cases, drivers, env, execute, plan
from ..records import Device, GroupKey, Status, TimingOptions
from ..store import Store
from .common import (
    DEFAULT_DB,
    interval_column,
    positive,
    prioritise,
    recorded_sweep,
    sparsity_list,
)


def add_parser(sub):
    p = sub.add_parser("table", help="print per-layer speedups measured by bench, or re-measure "
                                     "a tuned plan (--plan)")
    p.add_argument("--db", default=str(DEFAULT_DB))
    p.add_argument("--net", default=None, help="default: resnet50, or the plan's net")
    p.add_argument("--patterns", help="comma list (default: all measured)")
    p.add_argument("--kernels", help="comma list (default: all measured)")
    p.add_argument("--sparsities", help="comma list (default: all measured)")
    p.add_argument("--plan", help="a plan from autotune: re-measure each of its layers (its "
                                  "kernel and configuration against the dense baselines, "
                                  "interleaved, kernel-only and end to end) in one new run")
    p.add_argument("--rounds", type=positive(int, 1), default=7, help="with --plan")
    p.add_argument("--min-sample", type=positive(float, 0), default=2e-3, help="with --plan")
    p.add_argument("--case-timeout", type=positive(float, 0, strict=True), default=300.0,
                   help="with --plan")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.plan:
        return run_plan(args)
    args.net = args.net or "resnet50"
    store = Store(args.db, readonly=True)
    df = analysis.with_speedups(store.measurements())
    df = df[(df.net == args.net) & (df.status == Status.OK) & (df.pattern != "dense")]
    if args.patterns:
        df = df[df.pattern.isin(args.patterns.split(","))]
    if args.kernels:
        df = df[df.kernel.isin(args.kernels.split(","))]
    if args.sparsities:
        df = df[df.sparsity.isin(sparsity_list(args.sparsities))]
    if df.empty:
        raise UsageError(f"no successful sparse measurements for {args.net} with these filters "
                         f"in {args.db}; run `python -m harness bench` first")
    # one table per machine identity, device, batch, dtype, threads, kernel and sparsity: ratios
    # never mix rows measured under different conditions
    table = GroupKey.columns(layer=False) + ["kernel", "sparsity"]
    keys = table + ["layer"]
    bad = analysis.flagged(df)
    if "conf_rank" in df:  # raced after the sweep and flagged there
        bad |= df.conf_rank.notna() & ~analysis.confirmed(df)
    if bad.any():  # no best figure from a row whose timing cannot be taken at face value
        print(f"{int(bad.sum())} row(s) flagged implausible or contended (in the sweep or its "
              f"confirmation race) are left out of the best figures (`python -m harness export` lists them)")
        df = df[~bad]
        if df.empty:
            raise UsageError("every matching row is flagged implausible or contended: "
                             "measure again on a quieter machine")
    df = analysis.with_race_figures(df)  # raced once more after the sweep: the race's figures
    best = df.loc[df.groupby(keys)["speedup"].idxmax()]
    kbest = df.groupby(keys)["kernel_speedup"].max().rename("kernel-only")
    best = best.join(kbest, on=keys)
    for (fp, _net, batch, dtype, device, threads, kern, S), g in best.groupby(table):
        g = g.sort_values("layer_index")
        out = pd.DataFrame({"layer": g.layer, "shape": g["shape"], "count": g["count"],
                            "dense ms": g.dense_median_s * 1e3, "kernel ms": g.median_s * 1e3,
                            "e2e x": g.speedup, "e2e 95%": interval_column(g),
                            "kernel-only x": g["kernel-only"],
                            "confirmed": g.confirmed.map({True: "raced", False: ""}),
                            "noisy": g.noisy.map({1: "noisy", 0: ""}), "config": g.config})
        interpreted = Device(device).interpreted
        note = " [interpreter: a pipeline check, not GPU timings]" if interpreted else ""
        print(f"\n{args.net} {kern} S={S:g} (machine {fp[:6]}, device {device}, batch {batch}, "
              f"{threads} threads, {dtype}){note}")
        with pd.option_context("display.width", 250, "display.max_colwidth", 90,
                               "display.max_rows", None):
            print(out.round(3).to_string(index=False))
        nonstem = g[g.cin > 3]
        if interpreted:
            continue  # interpreter times are no speedups: no summary
        print(f"geometric mean over {len(nonstem)} unique non-stem shapes: end-to-end "
              f"{analysis.geomean(nonstem.speedup):.2f}x, kernel-only "
              f"{analysis.geomean(nonstem['kernel-only']):.2f}x")
    return 0


def run_plan(args) -> int:
    """Re-measure a plan: per layer its kernel and configuration interleaved with the dense
    baselines, in one new run (never a maximum over earlier sweep rows), then the per-layer
    table, geometric means over the unique non-stem layers and the summed network figure."""
    t0 = time.time()
    try:
        p = plan.load(args.plan)
    except (plan.PlanError, OSError, ValueError) as e:
        raise UsageError(f"--plan {args.plan}: {e}") from None
    net = args.net or p.net
    if net not in shapes.NETS:
        raise UsageError(f"unknown net {net!r}; valid: {', '.join(shapes.NETS)}")
    device = Device(p.device)
    fp = dict(env.fingerprint())
    fph, mh = env.identity_hash(fp), env.machine_hash(fp)
    try:
        p.check(net, p.pattern, p.sparsity, p.batch, fph, device)
    except plan.PlanError as e:
        raise UsageError(f"--plan {args.plan}: {e}") from None
    S, batch, dtype, threads = p.sparsity, p.batch, p.dtype, p.threads
    by_shape = {lay.shape_str: lay for lay in shapes.unique(shapes.load(net))}
    base = baseline.kernel_for(device)
    todo, chosen = [], {}
    for entry in p.layers:
        layer = by_shape.get(entry.shape)
        if layer is None:
            raise UsageError(f"--plan {args.plan}: layer {entry.layer} ({entry.shape}) "
                             f"is not a layer of {net}")
        for cfg in baseline.configs(base):
            todo.append(cases.make_case(layer, base, 0.0, cfg, batch, dtype, device, threads))
        k = kernels.get(entry.kernel)
        if k.pattern != "dense":
            case = cases.make_case(layer, k, S, entry.config, batch, dtype, device, threads,
                                   reason=k.supports(layer, S, entry.config, dtype))
            todo.append(case)
            chosen[layer.shape_str] = case.key
    store = Store(args.db)
    priority = prioritise(fp, device)
    fp["peak_gflops"] = round(env.measured_peak_gflops(threads, device.tensor_device), 1)
    run_id = store.start_run(fp, fph, mh, {k: v for k, v in vars(args).items() if k != "func"})
    print(f"table --plan {args.plan}: {net} {p.pattern} S={S:g}, {len(p.layers)} "
          f"layer(s) on {fp['cpu']}, {threads} threads, batch {batch}, device {device}; "
          f"re-measured in run {run_id} of {args.db}")
    if priority:
        print(priority)
    timing = TimingOptions(rounds=args.rounds, min_sample=args.min_sample)

    def sweep():
        with execute.LocalExecutor(timing, args.case_timeout) as ex:
            return drivers.sweep(ex, todo, store, run_id, resume=False,
                                 progress=not args.no_progress)

    counts = recorded_sweep(store, run_id, sweep)
    if counts.get("not run (stopped)"):
        print(f"table --plan stopped (Ctrl-C): {counts['not run (stopped)']} of {len(todo)} "
              f"case(s) not run; the table needs every layer of the plan, run it again",
              file=sys.stderr)
        return 130
    df = analysis.with_speedups(store.measurements(latest=False, fp_hash=fph))
    df = df[df.run_id == run_id]
    dense = baseline.table(df).set_index("layer")  # this run's best dense layout per layer
    rows = []
    for entry in p.layers:
        layer = by_shape[entry.shape]
        if layer.name not in dense.index:
            raise UsageError(f"the dense baseline of {layer.name} did not run; see "
                             f"`python -m harness export --db {args.db}`")
        d_s, d_k = dense.loc[layer.name, ["dense_s", "dense_kernel_s"]]
        row = {"layer": layer.name, "shape": layer.shape_str, "count": layer.count,
               "kernel": entry.kernel, "dense ms": d_s * 1e3, "sparse ms": d_s * 1e3,
               "e2e x": 1.0, "kernel-only x": 1.0, "status": "dense (plan)",
               "config": "", "cin": layer.cin, "d_s": d_s, "d_k": d_k, "s_s": d_s, "s_k": d_k}
        key = chosen.get(layer.shape_str)
        if key is not None:
            got = df[df.case_key == key].iloc[-1]
            row.update(config=str(entry.config), status=got.status)
            if got.status == Status.OK:
                flag = analysis.flagged(df.loc[[got.name]]).iloc[0]
                row.update({"sparse ms": got.median_s * 1e3, "e2e x": got.speedup,
                            "e2e 95%": interval_column(df.loc[[got.name]]).iloc[0],
                            "flag": (got.implausible or "contended") if flag else "",
                            "kernel-only x": got.kernel_speedup, "s_s": got.median_s,
                            "s_k": got.kernel_median_s, "d_s": got.dense_median_s,
                            "d_k": got.dense_kernel_median_s, "dense ms":
                            got.dense_median_s * 1e3})
            else:
                row.update({"e2e x": None, "kernel-only x": None})
        rows.append(row)
    t = pd.DataFrame(rows)
    shown = t.drop(columns=["cin", "d_s", "d_k", "s_s", "s_k"])
    with pd.option_context("display.width", 250, "display.max_colwidth", 80,
                           "display.max_rows", None):
        print(shown.round(3).to_string(index=False))
    ok = t[t.status.isin([Status.OK.value, "dense (plan)"])]
    nonstem = ok[ok.cin > 3]
    print(f"\ngeometric mean over {len(nonstem)} unique non-stem layers: end-to-end "
          f"{analysis.geomean(nonstem['e2e x']):.2f}x, kernel-only "
          f"{analysis.geomean(nonstem['kernel-only x']):.2f}x; lowest end-to-end "
          f"{nonstem['e2e x'].min():.2f}x ({nonstem.loc[nonstem['e2e x'].idxmin(), 'layer']})")
    if len(ok) == len(t):
        w = t["count"]
        print(f"summed network-level (per-layer times x counts, {int(w.sum())} convolutions): "
              f"end-to-end {(w * t.d_s).sum() / (w * t.s_s).sum():.2f}x, kernel-only "
              f"{(w * t.d_k).sum() / (w * t.s_k).sum():.2f}x")
    else:
        print(f"{len(t) - len(ok)} layer(s) did not run ok: no network-level figure")
    print(f"peak dense GEMM measured in this run: {fp['peak_gflops']:.0f} GFLOP/s; "
          f"table --plan finished in {time.time() - t0:.0f} s")
    return 0
