"""Seaborn figures for the report, returned as inline PNG data URIs (the report works offline)."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")
# names (layers, kernels) are data, not TeX: `$\undefined{$` is drawn as written, never parsed
matplotlib.rcParams["text.parse_math"] = False


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def layer_bars(best: pd.DataFrame, net: str, col: str = "speedup") -> str:
    """Per-layer speedup bars by kernel, one panel per sparsity (the CS paper's Fig. 5a/5b)."""
    d = best[best.net == net].copy()
    d["layer"] = d["layer"] + " (x" + d["count"].astype(str) + ")"
    order = d.sort_values("layer_index")["layer"].unique()
    sps = sorted(d.sparsity.unique())
    fig, axes = plt.subplots(len(sps), 1, figsize=(max(8, 0.42 * len(order) + 3), 2.6 * len(sps)),
                             sharex=True, squeeze=False)
    kinds = sorted(d.kernel.unique())
    lo, hi = _interval_columns(d, col)
    for ax, S in zip(axes[:, 0], sps):
        part = d[d.sparsity == S]
        sns.barplot(data=part, x="layer", y=col, hue="kernel", order=order, hue_order=kinds,
                    ax=ax, errorbar=None)
        if lo is not None:  # the stored 95% intervals (the confirmation race's where it ran)
            _error_bars(ax, part, order, kinds, col, lo, hi)
        ax.axhline(1.0, color="black", lw=1, ls="--")
        ax.set_ylabel(f"S={S:g}\nspeedup")
        ax.set_xlabel("")
        ax.legend(fontsize=7, ncol=4, loc="upper right")
    axes[-1, 0].tick_params(axis="x", rotation=75, labelsize=7)
    fig.suptitle(f"{net}: per-layer speedup vs best dense ({'end-to-end' if col == 'speedup' else 'kernel-only'})")
    return _png(fig)


def _interval_columns(d: pd.DataFrame, col: str):
    """The interval columns of a bar column, where the rows hold them: the end-to-end speedup's,
    or the kernel-only one's where the best kernel-only figure is the row's own."""
    lo, hi = ("speedup_lo", "speedup_hi") if col == "speedup" else (
        "kernel_speedup_lo", "kernel_speedup_hi")
    if lo not in d or not d[lo].notna().any():
        return None, None
    if col != "speedup" and "kernel_speedup" in d:
        same = (d[col] - d.kernel_speedup).abs() <= 1e-9 * d[col].abs()
        d[lo], d[hi] = d[lo].where(same), d[hi].where(same)
    return lo, hi


def _error_bars(ax, part: pd.DataFrame, order, kinds, col: str, lo: str, hi: str) -> None:
    """One error bar per drawn bar: bars are matched to rows by hue (containers follow
    ``kinds``) and by the layer at the bar's centre."""
    for kind, bars in zip(kinds, ax.containers):
        rows = part[part.kernel == kind].set_index("layer")
        for bar in bars:
            i = int(round(bar.get_x() + bar.get_width() / 2))
            if not 0 <= i < len(order) or order[i] not in rows.index:
                continue
            r = rows.loc[order[i]]
            r = r.iloc[0] if isinstance(r, pd.DataFrame) else r
            if pd.isna(r[lo]) or pd.isna(r[hi]):
                continue
            y = float(r[col])
            ax.errorbar(bar.get_x() + bar.get_width() / 2, y,
                        yerr=[[max(y - float(r[lo]), 0)], [max(float(r[hi]) - y, 0)]],
                        fmt="none", ecolor="black", elinewidth=0.8, capsize=2)


def network_lines(net_table: pd.DataFrame) -> str:
    """Network-level speedup against sparsity per pattern and net (Fig. 5c)."""
    nets = sorted(net_table.net.unique())
    fig, axes = plt.subplots(1, len(nets), figsize=(5 * len(nets), 3.6), squeeze=False)
    for ax, net in zip(axes[0], nets):
        sns.lineplot(data=net_table[net_table.net == net], x="sparsity", y="speedup",
                     hue="pattern", style="machine", markers=True, ax=ax)
        ax.axhline(1.0, color="black", lw=1, ls="--")
        ax.set_title(net)
        ax.set_ylabel("network speedup (end-to-end)")
    return _png(fig)


def param_heatmap(sens: pd.DataFrame, pattern: str, param: str) -> str:
    """Speedup by layer x parameter value at each sparsity (the OVW appendix's tables)."""
    sps = sorted(sens.sparsity.unique())
    fig, axes = plt.subplots(1, len(sps), figsize=(3.2 * len(sps) + 2, 0.28 * sens.layer.nunique() + 2),
                             squeeze=False, sharey=True)
    for ax, S in zip(axes[0], sps):
        piv = sens[sens.sparsity == S].pivot_table(index="layer", columns="value", values="speedup",
                                                   aggfunc="max")
        sns.heatmap(piv, annot=True, fmt=".1f", cmap="RdYlGn", center=1.0, cbar=False, ax=ax,
                    annot_kws={"fontsize": 7})
        ax.set_title(f"S={S:g}")
        ax.set_xlabel(param)
    fig.suptitle(f"{pattern}: speedup by {param}")
    return _png(fig)


def roofline(ok: pd.DataFrame, peak: float | None) -> str:
    """Achieved GFLOP/s (work actually done and dense-equivalent) against the measured peak."""
    d = ok.copy()
    d["actual GFLOP/s"] = d["flops"] * (1 - d["sparsity"]) / d["median_s"] / 1e9
    d["dense-equivalent GFLOP/s"] = d["flops"] / d["median_s"] / 1e9
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, col in zip(axes, ["actual GFLOP/s", "dense-equivalent GFLOP/s"]):
        sns.stripplot(data=d, x="kernel", y=col, hue="sparsity", ax=ax, size=3, jitter=0.25,
                      palette="viridis")
        if peak:
            ax.axhline(peak, color="red", ls="--", lw=1.2, label=f"measured GEMM peak {peak:.0f}")
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    return _png(fig)


def efficiency(eff: pd.DataFrame) -> str:
    """Per kernel and sparsity: each layer's useful GFLOP/s as a share of the run's GEMM peak."""
    d = eff.assign(pct=eff.efficiency * 100,
                   S=eff.sparsity.map(lambda v: "dense" if v == 0 else f"{v:g}"))
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * d.kernel.nunique() + 4), 3.8))
    sns.stripplot(data=d, x="kernel", y="pct", hue="S", ax=ax, size=4, jitter=0.25,
                  palette="viridis", dodge=True)
    ax.axhline(100, color="red", ls="--", lw=1.2, label="GEMM peak (same run)")
    ax.set_ylabel("useful GFLOP/s, % of GEMM peak")
    ax.set_xlabel("")
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    return _png(fig)


def e2e_bars(e2e: pd.DataFrame) -> str:
    """Measured end-to-end speedup beside the summed-convolution estimate, per network case."""
    d = e2e.assign(case=e2e.net + " " + e2e.pattern + " S=" + e2e.sparsity.map("{:g}".format)
                   + " b" + e2e.batch.astype(str))
    long = pd.concat([d.assign(kind="measured end to end", x=d.speedup),
                      d.assign(kind="summed convolutions (same run)", x=d.estimate)])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(d) + 3), 3.6))
    sns.barplot(data=long, x="case", y="x", hue="kind", ax=ax, errorbar=None)
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.set_ylabel("speedup over dense")
    ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    ax.legend(fontsize=8)
    return _png(fig)
