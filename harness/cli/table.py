"""``python -m harness table``: per-layer speedups (end-to-end and kernel-only) from the store,
best configuration per kernel, with geometric means over the unique non-stem shapes."""

from __future__ import annotations

import pandas as pd

from .. import UsageError, analysis
from ..records import Device, Status
from ..store import Store
from .common import DEFAULT_DB, sparsity_list


def add_parser(sub):
    p = sub.add_parser("table", help="print per-layer speedups measured by bench")
    p.add_argument("--db", default=str(DEFAULT_DB))
    p.add_argument("--net", default="resnet50")
    p.add_argument("--patterns", help="comma list (default: all measured)")
    p.add_argument("--kernels", help="comma list (default: all measured)")
    p.add_argument("--sparsities", help="comma list (default: all measured)")
    p.set_defaults(func=run)


def run(args) -> int:
    store = Store(args.db, create=False)
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
    table = ["fp_hash", "device", "batch", "dtype", "threads", "kernel", "sparsity"]
    keys = table + ["layer"]
    best = df.loc[df.groupby(keys)["speedup"].idxmax()]
    kbest = df.groupby(keys)["kernel_speedup"].max().rename("kernel-only")
    best = best.join(kbest, on=keys)
    for (fp, device, batch, dtype, threads, kern, S), g in best.groupby(table):
        g = g.sort_values("layer_index")
        out = pd.DataFrame({"layer": g.layer, "shape": g["shape"], "count": g["count"],
                            "dense ms": g.dense_median_s * 1e3, "kernel ms": g.median_s * 1e3,
                            "e2e x": g.speedup, "kernel-only x": g["kernel-only"],
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
