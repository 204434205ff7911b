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
        out |= _text(df.implausible)
    if "contended" in df:
        out |= df.contended.fillna(0).astype(bool)
    return out


def confirmed(df: pd.DataFrame) -> pd.Series:
    """Rows whose confirmation race (``harness.confirm``) timed them clean: not contended, not
    above the FLOP ideal, not failed."""
    if "conf_rank" not in df:
        return pd.Series(False, index=df.index)
    return (df.conf_rank.notna() & df.conf_speedup.notna() & ~_text(df.conf_reason)
            & ~df.conf_contended.fillna(0).astype(bool) & ~_text(df.conf_implausible))


def _text(col: pd.Series) -> pd.Series:
    return col.notna() & (col.astype(str) != "")


RACED = ("speedup", "speedup_lo", "speedup_hi", "kernel_speedup", "kernel_speedup_lo",
         "kernel_speedup_hi", "median_s", "dense_median_s")


def with_race_figures(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` (with speedups) where each ``confirmed`` row's figures are its confirmation
    race's (``RACED``; a median the race did not store stays the sweep's), and a ``confirmed``
    column."""
    df = df.copy()
    c = confirmed(df)
    for col in RACED:
        if "conf_" + col in df and col in df:
            conf = df["conf_" + col].astype(float)
            keep = ~c | (conf.isna() if col.endswith("median_s") else False)
            df[col] = df[col].astype(float).where(keep, conf)
    if "flops" in df and "median_s" in df:
        df["gflops"] = df["flops"] / df["median_s"] / 1e9
    df["confirmed"] = c
    return df


def best_per_layer(df: pd.DataFrame) -> pd.DataFrame:
    """Best ok, unflagged sparse case per (group, layer, pattern, sparsity) by end-to-end
    speedup. Where a confirmation race ran for the slot, only the rows it timed clean take
    part, with the race's figures and intervals (``confirmed`` True; ``tied_with`` names the
    runner-up where their intervals overlap, so neither is claimed faster); elsewhere the sweep's
    rows, ``confirmed`` False."""
    s = with_speedups(df[(df.pattern != "dense") & (df.status == Status.OK) & ~flagged(df)])
    if s.empty:
        return s
    keys = GROUP + ["layer", "pattern", "sparsity"]
    s = with_race_figures(s)
    if "conf_rank" in s:  # in a raced slot only the rows the race timed clean count
        raced = s.groupby(keys, dropna=False)["conf_rank"].transform(lambda v: v.notna().any())
        s = s[~raced.astype(bool) | s.confirmed].copy()
        if s.empty:
            return s
    s["_slot"] = s.groupby(keys, dropna=False).ngroup()
    idx = s.groupby(keys)["speedup"].idxmax()
    best = s.loc[idx].copy()
    best["tied_with"] = None
    if "conf_vs_other_lo" in best:
        for i, r in best.iterrows():
            lo, hi = r.get("conf_vs_other_lo"), r.get("conf_vs_other_hi")
            if not r.confirmed or pd.isna(lo) or not lo <= 1 <= hi:
                continue
            same = (s._slot == r._slot) & (s.index != i) & s.confirmed
            if same.any():
                o = s[same].iloc[0]
                best.at[i, "tied_with"] = f"{o.kernel} {o.config}"
    kbest = s.groupby(keys, as_index=False)["kernel_speedup"].max().rename(
        columns={"kernel_speedup": "best_kernel_speedup"})
    return best.drop(columns="_slot").merge(kbest, on=keys)


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
    imp = int(_text(ok.implausible).sum())
    con = int(ok.contended.fillna(0).astype(bool).sum())
    ret = int(ok.retaken.fillna(0).sum())
    share = ok.contention.max() if ok.contention.notna().any() else 0.0
    raced = ""
    if "conf_rank" in ok and ok.conf_rank.notna().any():
        n = int(ok.conf_rank.notna().sum())
        out = int((ok.conf_rank.notna() & ~confirmed(ok)).sum())
        raced = (f"; {n} best and runner-up row(s) raced again in confirmation, {out} of them "
                 f"flagged or failed there")
    return (f"trust: {rem} row(s) re-measured for a ratio above the FLOP ideal or a slow "
            f"dense run beside them, {imp} still so (flagged implausible), {con} contended by "
            f"other work after retakes (flagged), {ret} round(s) retaken; largest other-work "
            f"share in a kept round {share:.2f} of a core{raced}; flagged rows feed no best "
            f"figure")
