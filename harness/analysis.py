"""Speedups from stored measurements.

Per case: end-to-end speedup = interleaved dense median / case median (NCHW in and out, layout
conversion included); kernel-only = dense resident median / case resident median. The dense
baseline of a layer is its faster layout, measured.

Network level per net x pattern x sparsity: sum(count x dense) / sum(count x best sparse), where
each layer's sparse time is its dense time over its best speedup and layers the pattern cannot
handle count at dense time (and are listed).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd


def with_speedups(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    if df.empty:
        for c in ("speedup", "kernel_speedup", "gflops"):
            df[c] = pd.Series(dtype=float)
        return df
    df["speedup"] = df["dense_median_s"] / df["median_s"]
    df["kernel_speedup"] = df["dense_kernel_median_s"] / df["kernel_median_s"]
    df["gflops"] = df["flops"] / df["median_s"] / 1e9
    return df


def dense_baselines(df: pd.DataFrame) -> pd.DataFrame:
    """Per (machine, net, layer, batch, dtype, threads): fastest dense layout and its time."""
    keys = ["fp_hash", "net", "layer", "batch", "dtype", "device", "threads"]
    d = df[(df.pattern == "dense") & (df.status == "ok")]
    if d.empty:
        return pd.DataFrame(columns=keys + ["dense_s", "dense_kernel_s", "dense_layout", "count",
                                            "shape", "flops", "layer_index"])
    d = d.assign(layout=d.config.map(lambda c: json.loads(c)["layout"]))
    best = d.sort_values("median_s").groupby(keys, as_index=False).first()
    kern = d.groupby(keys, as_index=False)["kernel_median_s"].min()
    best = best.merge(kern.rename(columns={"kernel_median_s": "dense_kernel_s"}), on=keys)
    return best.rename(columns={"median_s": "dense_s", "layout": "dense_layout"})[
        keys + ["dense_s", "dense_kernel_s", "dense_layout", "count", "shape", "flops",
                "layer_index"]]


def best_per_layer(df: pd.DataFrame) -> pd.DataFrame:
    """Best ok sparse case per (machine, net, layer, pattern, sparsity) by end-to-end speedup."""
    s = with_speedups(df[(df.pattern != "dense") & (df.status == "ok")])
    if s.empty:
        return s
    keys = ["fp_hash", "net", "layer", "batch", "dtype", "device", "threads", "pattern",
            "sparsity"]
    idx = s.groupby(keys)["speedup"].idxmax()
    best = s.loc[idx].copy()
    kbest = s.groupby(keys, as_index=False)["kernel_speedup"].max().rename(
        columns={"kernel_speedup": "best_kernel_speedup"})
    return best.merge(kbest, on=keys)


def network_table(df: pd.DataFrame) -> pd.DataFrame:
    base = dense_baselines(df)
    best = best_per_layer(df)
    rows = []
    if base.empty:
        return pd.DataFrame(rows)
    sparse = df[df.pattern != "dense"]
    groups = sparse.groupby(["fp_hash", "net", "batch", "dtype", "device", "threads", "pattern",
                             "sparsity"]).size().index
    for fp, net, batch, dtype, device, threads, pattern, S in groups:
        b = base[(base.fp_hash == fp) & (base.net == net) & (base.batch == batch) &
                 (base.dtype == dtype) & (base.device == device) & (base.threads == threads)]
        if b.empty:
            continue
        bb = best[(best.fp_hash == fp) & (best.net == net) & (best.batch == batch) &
                  (best.dtype == dtype) & (best.threads == threads) &
                  (best.pattern == pattern) & (best.sparsity == S)] if not best.empty else best
        sp = dict(zip(bb.layer, bb.speedup)) if len(bb) else {}
        ksp = dict(zip(bb.layer, bb.best_kernel_speedup)) if len(bb) else {}
        dense_t = float((b["count"] * b["dense_s"]).sum())
        dense_k = float((b["count"] * b["dense_kernel_s"]).sum())
        sparse_t = float(sum(r["count"] * r["dense_s"] / sp.get(r["layer"], 1.0)
                             for _, r in b.iterrows()))
        sparse_k = float(sum(r["count"] * r["dense_kernel_s"] / ksp.get(r["layer"], 1.0)
                             for _, r in b.iterrows()))
        uncovered = [r["layer"] for _, r in b.iterrows() if r["layer"] not in sp]
        rows.append({"fp_hash": fp, "net": net, "batch": batch, "dtype": dtype,
                     "device": device, "threads": threads, "pattern": pattern, "sparsity": S,
                     "layers": len(b), "covered": len(b) - len(uncovered),
                     "speedup": dense_t / sparse_t, "kernel_speedup": dense_k / sparse_k,
                     "dense_ms": dense_t * 1e3, "sparse_ms": sparse_t * 1e3,
                     "at_dense": ", ".join(uncovered)})
    return pd.DataFrame(rows)


def geomean(x) -> float:
    x = np.asarray(list(x), dtype=float)
    x = x[np.isfinite(x) & (x > 0)]
    return float(np.exp(np.log(x).mean())) if len(x) else float("nan")
