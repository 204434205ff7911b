"""Speedups from stored measurements.

Per case: end-to-end speedup = interleaved dense median / case median (NCHW in and out, layout
conversion included); kernel-only = dense resident median / case resident median. The dense
baseline of a layer is its faster layout, measured.

Ratios are only taken between rows of one group: the same machine and software identity,
device, batch, dtype and thread count. Network level per group x pattern x sparsity:
sum(count x dense) / sum(count x best sparse), where each layer's sparse time is its dense time
over its best speedup and layers the pattern cannot handle count at dense time (and are
listed).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import baseline
from .records import GroupKey, Status


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
    """Per (identity, net, layer, batch, dtype, device, threads): the baseline (harness.baseline)."""
    return baseline.table(df)


# cases whose times may be compared (one machine and software, device, batch, dtype, threads),
# over the layers of a net
GROUP = GroupKey.columns(layer=False)


def flagged(df: pd.DataFrame) -> pd.Series:
    """Rows whose timing cannot be taken at face value: a ratio above the FLOP ideal that a
    re-measurement confirmed (``implausible``), or rounds that stayed contended by other work
    after their retakes (``contended``). They stay in the store and the full table, marked;
    no best figure is taken from them."""
    out = pd.Series(False, index=df.index)
    if "implausible" in df:
        out |= df.implausible.notna() & (df.implausible != "")
    if "contended" in df:
        out |= df.contended.fillna(0).astype(bool)
    return out


def best_per_layer(df: pd.DataFrame) -> pd.DataFrame:
    """Best ok, unflagged sparse case per (group, layer, pattern, sparsity) by end-to-end
    speedup."""
    s = with_speedups(df[(df.pattern != "dense") & (df.status == Status.OK) & ~flagged(df)])
    if s.empty:
        return s
    keys = GROUP + ["layer", "pattern", "sparsity"]
    idx = s.groupby(keys)["speedup"].idxmax()
    best = s.loc[idx].copy()
    kbest = s.groupby(keys, as_index=False)["kernel_speedup"].max().rename(
        columns={"kernel_speedup": "best_kernel_speedup"})
    return best.merge(kbest, on=keys)


def network_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per group, pattern and sparsity: summed dense time over summed best sparse time, each
    layer weighted by its count; layers without a sparse measurement count at dense time."""
    base = dense_baselines(df)
    best = best_per_layer(df)
    rows = []
    if base.empty:
        return pd.DataFrame(rows)
    sparse = df[df.pattern != "dense"]
    if sparse.empty:
        return pd.DataFrame(rows)
    bases = {k: g for k, g in base.groupby(GROUP)}
    bests = {k: g for k, g in best.groupby(GROUP + ["pattern", "sparsity"])} if len(best) else {}
    for key in sparse.groupby(GROUP + ["pattern", "sparsity"]).size().index:
        g, (pattern, S) = key[:len(GROUP)], key[len(GROUP):]
        b = bases.get(g)
        if b is None:
            continue
        bb = bests.get(key)
        sp = dict(zip(bb.layer, bb.speedup)) if bb is not None else {}
        ksp = dict(zip(bb.layer, bb.best_kernel_speedup)) if bb is not None else {}
        dense_t = float((b["count"] * b["dense_s"]).sum())
        dense_k = float((b["count"] * b["dense_kernel_s"]).sum())
        sparse_t = float(sum(r["count"] * r["dense_s"] / sp.get(r["layer"], 1.0)
                             for _, r in b.iterrows()))
        sparse_k = float(sum(r["count"] * r["dense_kernel_s"] / ksp.get(r["layer"], 1.0)
                             for _, r in b.iterrows()))
        uncovered = [r["layer"] for _, r in b.iterrows() if r["layer"] not in sp]
        rows.append({**dict(zip(GROUP, g)), "pattern": pattern, "sparsity": S,
                     "layers": len(b), "covered": len(b) - len(uncovered),
                     "speedup": dense_t / sparse_t, "kernel_speedup": dense_k / sparse_k,
                     "dense_ms": dense_t * 1e3, "sparse_ms": sparse_t * 1e3,
                     "at_dense": ", ".join(uncovered)})
    return pd.DataFrame(rows)


def geomean(x) -> float:
    x = np.asarray(list(x), dtype=float)
    x = x[np.isfinite(x) & (x > 0)]
    return float(np.exp(np.log(x).mean())) if len(x) else float("nan")


def trust_summary(df: pd.DataFrame) -> str | None:
    """One line on the rows a run could not take at face value: re-measured for plausibility,
    flagged implausible, contended by other work (largest share seen), rounds retaken."""
    if df.empty or "remeasured" not in df:
        return None
    ok = df[df.status == Status.OK]
    rem = int(ok.remeasured.fillna(0).sum())
    imp = int((ok.implausible.notna() & (ok.implausible != "")).sum())
    con = int(ok.contended.fillna(0).astype(bool).sum())
    ret = int(ok.retaken.fillna(0).sum())
    share = ok.contention.max() if ok.contention.notna().any() else 0.0
    return (f"trust: {rem} row(s) re-measured for a ratio above the FLOP ideal, {imp} still "
            f"above it (flagged implausible), {con} contended by other work after retakes "
            f"(flagged), {ret} round(s) retaken; largest other-work share in a kept round "
            f"{share:.2f} of a core; flagged rows feed no best figure")
