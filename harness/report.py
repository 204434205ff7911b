"""The HTML speedup report: one self-contained file (figures inline) from a jinja2 template."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import jinja2
import pandas as pd

from kernels import patterns as P

from . import UsageError, analysis, figures, plan
from .outputs import output_file, writing
from .records import (
    INTERVAL_COLUMNS,
    Device,
    GroupKey,
    Status,
    handover_saved_s,
    images_per_call,
    residual_fused,
)
from .store import Store

TEMPLATES = Path(__file__).resolve().parent.parent / "reports" / "templates"
PUBLISHED = Path(__file__).resolve().parent.parent / "results" / "published"
PAPER = Path(__file__).resolve().parent / "data" / "paper_results.csv"
# each pattern's swept parameter, from the pattern registry
PARAM = {name: param for name, (param, _) in P.SWEEP_PARAMS.items() if param}


def _machines(store: Store, df: pd.DataFrame) -> list[dict]:
    runs = store.runs()
    out = []
    for fp_hash, grp in runs.groupby("fp_hash", sort=False):
        if fp_hash not in set(df.fp_hash):
            continue
        fp = json.loads(grp.iloc[-1].fingerprint)
        sub = df[df.fp_hash == fp_hash]
        peaks = [json.loads(f).get("peak_gflops") for f in grp.fingerprint]
        nices = pd.Series([json.loads(f).get("nice") for f in grp.fingerprint]).dropna()
        nices = nices.astype(int).value_counts().sort_index()
        out.append({
            "fp_hash": fp_hash, "label": f"{fp.get('cpu')} / {fp.get('gpu') or 'no GPU'} "
                                         f"[{fp_hash[:6]}]",
            "cpu": fp.get("cpu"), "cores": fp.get("cores"), "isa": ", ".join(fp.get("cpu_isa", [])),
            "gpu": fp.get("gpu") or "none", "driver": fp.get("gpu_driver") or "-",
            "torch": fp.get("torch"), "triton": fp.get("triton"), "numpy": fp.get("numpy"),
            "python": fp.get("python"), "commit": (fp.get("git_commit") or "?")[:10],
            "dirty": fp.get("git_dirty"), "kernel_isa": fp.get("kernel_isa"),
            "dates": ", ".join(sorted({dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")
                                       for t in grp.started})),
            "threads": ", ".join(map(str, sorted(sub.threads.dropna().unique()))),
            "batch": ", ".join(map(str, sorted(sub.batch.dropna().unique()))),
            "dtype": ", ".join(sorted(sub.dtype.dropna().unique())),
            "devices": ", ".join(sorted(sub.device.dropna().unique())),
            "peak": max([p for p in peaks if p] or [0]) or None, "runs": len(grp),
            "nice": "; ".join(
                f"nice {n} ({c} run{'s' if c > 1 else ''}, "
                f"{'ahead of other work at nice 0' if n < 0 else 'not raised'})"
                for n, c in nices.items()) or "not recorded"})
    return out


def _efficiency(ok: pd.DataFrame, store: Store) -> pd.DataFrame:
    """Per machine, kernel, sparsity and layer (its best row): useful GFLOP/s (the FLOPs of the
    kept weights over the kernel-only time) as a fraction of the fp32 GEMM peak measured at the
    start of the same run."""
    runs = store.runs()
    peak = {r.run_id: json.loads(r.fingerprint).get("peak_gflops")
            for r in runs.itertuples()}
    d = ok.assign(peak=ok.run_id.map(peak))
    d = d[d.peak.fillna(0) > 0]
    if d.empty:
        return d
    t = d.kernel_median_s.where(d.kernel_median_s > 0, d.median_s)
    d = d.assign(useful=d.flops * (1 - d.sparsity) / t / 1e9)
    d = d.assign(efficiency=d.useful / d.peak)
    keys = ["machine", "kernel", "sparsity", "layer"]
    return d.loc[d.groupby(keys)["efficiency"].idxmax()]


def _efficiency_table(eff: pd.DataFrame) -> list[dict]:
    if eff.empty:
        return []
    g = eff.groupby(["machine", "kernel", "sparsity"])
    out = pd.DataFrame({"layers": g.size(), "median": g.efficiency.median() * 100,
                        "best": g.efficiency.max() * 100, "useful": g.useful.median(),
                        "peak": g.peak.median()}).round(1).reset_index()
    return out.to_dict("records")


def _param_value(row) -> str:
    p = json.loads(row["param"]) if isinstance(row["param"], str) and row["param"] else {}
    return ", ".join(f"{v}" for v in p.values()) or "-"


def _sensitivity(ok: pd.DataFrame):
    out = []
    for pattern, key in PARAM.items():
        d = ok[ok.pattern == pattern]
        if d.empty:
            continue
        d = d.assign(value=d.apply(_param_value, axis=1))
        if d.value.nunique() < 2:
            continue
        table = d.pivot_table(index=["net", "layer", "sparsity"], columns="value",
                              values="speedup", aggfunc="max").round(2).reset_index()
        out.append({"pattern": pattern, "param": key, "img": figures.param_heatmap(
            d.assign(layer=d.net + ":" + d.layer), pattern, key),
            "table": table.to_html(index=False, classes="tbl", na_rep="-")})
    return out


def _paper(best: pd.DataFrame, net_table: pd.DataFrame) -> pd.DataFrame:
    paper = pd.read_csv(PAPER)
    rows = []
    for _, p in paper.iterrows():
        meas = kmeas = None
        device = "cpu" if p.device_class == "cpu" else "cuda"
        if p.layer == "ALL" and not net_table.empty:
            m = net_table[(net_table.net == p.net) & (net_table.pattern == p.pattern) &
                          (net_table.device == device) & (net_table.batch == p.batch) &
                          ((net_table.sparsity - p.sparsity).abs() < 1e-9)]
            if len(m):
                meas, kmeas = m.speedup.max(), m.kernel_speedup.max()
        elif p.layer != "ALL" and not best.empty:
            # like with like: the paper's batch (best over the pattern parameter: the CS paper
            # chose M "on demand"); a paper row without a batch matches none of ours
            m = best[(best.net == p.net) & (best.layer == p.layer) &
                     (best.pattern == p.pattern) & (best.device == device) &
                     (best.batch == p.batch) &
                     ((best.sparsity - p.sparsity).abs() < 1e-9)]
            if len(m):
                meas, kmeas = m.speedup.max(), m.best_kernel_speedup.max()
        rows.append({"source": p.source, "pattern": p.pattern, "paper hardware": p.hardware,
                     "net": p.net, "paper layer": p.paper_label, "mapped layer": p.layer,
                     "batch": int(p.batch) if p.batch == p.batch else "not stated",
                     "sparsity": p.sparsity, "param": p.param,
                     "paper speedup": p.speedup_vs_dense,
                     "measured e2e": "not measured" if meas is None else round(meas, 2),
                     "measured kernel-only": "not measured" if kmeas is None else round(kmeas, 2),
                     "note": "; ".join(filter(None, [
                         p.note if isinstance(p.note, str) else "",
                         "" if p.batch == p.batch else "the paper states no batch size: not "
                                                      "compared"]))})
    return pd.DataFrame(rows)


def _tuning(store: Store) -> pd.DataFrame:
    t = store.tuning()
    if t.empty:
        return t
    return t.sort_values("id").groupby("tune_key").last().reset_index()


def published(folder: str | Path | None = PUBLISHED) -> list[dict]:
    """The GPU leases' summaries committed under ``results/published/<date>_<gpu>/`` (each a
    ``summary.csv`` written by ``python -m harness lease``): per folder, where and when it was
    measured and its figures. Interpreter dry runs are never published and are left out."""
    if not folder or not Path(folder).is_dir():
        return []
    out = []
    for f in sorted(Path(folder).glob("*/summary.csv")):
        try:
            df = pd.read_csv(f)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
            continue
        if df.empty or "device" not in df or (df.device != Device.CUDA.value).any():
            continue
        first = df.iloc[0]
        figures = df[df.what.isin(["layer", "tuned", "network eager", "network graph"])
                     & (df.status == Status.OK.value)]
        cols = [c for c in ("what", "layer", "net", "batch", "dtype", "sparsity", "kernel",
                            "us", "cudnn_nchw_us", "cudnn_nhwc_us", "x_cudnn", "frac_ceiling",
                            "frac_bandwidth", "timing_mode") if c in figures]
        ceil = df[df.what == "ceiling"]
        out.append({"folder": f.parent.name, "gpu": first.get("gpu"),
                    "driver": first.get("driver"), "date": first.get("date"),
                    "commit": str(first.get("commit"))[:10], "torch": first.get("torch"),
                    "triton": first.get("triton"), "cudnn": first.get("cudnn"),
                    "ceilings": ", ".join(f"{r.kernel} {r.value:.4g} {r.unit}"
                                          for r in ceil.itertuples()),
                    "table": figures[cols].round(3).to_html(index=False, classes="tbl",
                                                            na_rep="-")})
    return out


def build(db: str | Path, out: str | Path, plans_dir: str | Path | None = None,
          published_dir: str | Path | None = PUBLISHED) -> Path:
    path = Path(db)
    out = output_file(out)
    if not path.exists():
        raise UsageError(f"no results database at {path}; run `nox -s bench` (or "
                         f"`python -m harness bench --quick`) first")
    store = Store(path, readonly=True)
    everything = store.measurements()
    if everything.empty and store.e2e().empty:
        raise UsageError(f"the results database {path} holds no measurements yet; run "
                         f"`python -m harness bench --quick` first")
    # interpreter rows check the GPU pipeline; their times are never shown as speedups
    interp = everything.device == Device.CUDA_INTERPRET.value
    raw = everything[~interp]
    df = analysis.with_speedups(raw)
    df["machine"] = df.fp_hash.str[:6]
    e2e_rows = store.e2e()
    machines = _machines(store, pd.concat([everything, e2e_rows])[[
        "fp_hash", "threads", "batch", "dtype", "device"]])
    ok = df[(df.status == Status.OK) & (df.pattern != "dense")]
    best = analysis.best_per_layer(raw)
    net = analysis.network_table(raw)
    trust = {fp[:6]: analysis.trust_summary(g) for fp, g in raw.groupby("fp_hash")}
    if not net.empty:
        net["machine"] = net.fp_hash.str[:6]
    ctx = {"generated": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "db": str(path),
           "machines": machines, "trust": trust,
           "counts": everything.status.value_counts().to_dict(),
           "nets": [], "net_img": None, "net_table": None}
    for n in sorted(best.net.unique()) if not best.empty else []:
        ctx["nets"].append({"net": n, "img": figures.layer_bars(best, n, "speedup"),
                            "img_kernel": figures.layer_bars(best, n, "best_kernel_speedup")})
    if not net.empty:
        ctx["net_img"] = figures.network_lines(net)
        cols = ["machine", "net", "device", "batch", "threads", "pattern", "sparsity", "covered",
                "layers", "speedup", "kernel_speedup", "dense_ms", "sparse_ms", "at_dense"]
        ctx["net_table"] = net[cols].round(3).to_html(index=False, classes="tbl")
        ctx["net_records"] = net[cols].round(2).to_dict("records")
    ctx["sensitivity"] = _sensitivity(ok)
    peak = max([m["peak"] or 0 for m in machines] or [0]) or None
    ctx["roofline"] = figures.roofline(ok[ok.device == "cpu"], peak) if len(ok) else None
    ctx["peak"] = peak
    eff = _efficiency(df[(df.status == Status.OK) & (df.device == Device.CPU.value)], store)
    ctx["efficiency_img"] = figures.efficiency(eff) if len(eff) else None
    ctx["efficiency"] = _efficiency_table(eff)
    ctx["paper"] = _paper(best, net).to_html(index=False, classes="tbl", na_rep="not measured")
    tuning = _tuning(store)
    ctx["tuning"] = None if tuning.empty else tuning[[
        "pattern", "sparsity", "shape", "kernel", "config", "median_s", "dense_median_s",
        "status"]].to_html(index=False, classes="tbl")
    ctx["plans"] = _plans(plans_dir)
    ctx.update(_e2e(e2e_rows, net))
    ctx["gpu_rows"] = int((df.device == Device.CUDA.value).sum())
    ctx["interpreted"] = _interpreted(everything[interp])
    ctx["published"] = published(published_dir)
    if len(machines) > 1 and not best.empty:
        cmp_ = best.assign(machine=best.fp_hash.str[:6]).pivot_table(
            index=["net", "layer", "pattern", "sparsity"], columns="machine", values="speedup",
            aggfunc="max").round(2).reset_index()
        ctx["compare"] = cmp_.to_html(index=False, classes="tbl", na_rep="-")
    full = df.assign(param=df.apply(_param_value, axis=1))[[
        "machine", "net", "layer", "shape", "count", "device", "pattern", "sparsity", "param",
        "kernel", "config", "status", "rel_err", "median_s", "kernel_median_s",
        "dense_median_s", "speedup", "kernel_speedup", "noisy", "reason"]]
    full = full.assign(median_ms=full.median_s * 1e3).drop(columns="median_s")
    full = full.assign(bad=full.status.map(lambda st: Status(st).failed))
    ctx["full_rows"] = full.round(4).to_dict("records")
    ctx["untimed"] = full[full.status != Status.OK].to_dict("records")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             autoescape=jinja2.select_autoescape(["html", "j2"]))
    html = env.get_template("report.html.j2").render(**ctx)
    with writing(out):
        out.write_text(html)
    return out


# the answer's engine columns (None for an answer summed from bench rows)
NO_ENGINES = dict.fromkeys(("best_dense_engine", "dense_engines", "best_dense_s",
                            "sparse_latency_s", "speedup_best", "speedup_eager", "deepsparse_s",
                            "vs_deepsparse", *INTERVAL_COLUMNS))


def _nan_none(v):
    return None if v is None or v != v else v


def _engines(e2e: pd.DataFrame) -> tuple[list, list]:
    """(every engine of every e2e row, one per engine and version with the settings that
    decide its figures)."""
    rows, settings = [], {}
    for r in e2e.itertuples():
        for e in json.loads(r.engines) if isinstance(getattr(r, "engines", None), str) else []:
            rows.append({"machine": r.fp_hash[:6], "net": r.net, "pattern": r.pattern,
                         "sparsity": r.sparsity, "batch": r.batch, **e,
                         "bad": Status(e["status"]).failed})
            if e.get("version") is not None:
                settings[(e["engine"], e["version"])] = {
                    "engine": e["engine"], "label": e["label"], "version": e["version"],
                    "settings": ", ".join(f"{k}={v}" for k, v in (e.get("settings") or {}).items())}
    return rows, list(settings.values())


def _e2e(e2e: pd.DataFrame, net_table: pd.DataFrame) -> dict:
    """The answer the page opens with (per machine, network, sparsity, batch and device: the
    fastest pattern, measured end to end where ``e2e`` ran, else summed per layer from bench),
    and the end-to-end section."""
    out = {"answer": [], "e2e_rows": [], "e2e_img": None, "e2e_interpreted": [],
           "e2e_paper": [], "engine_rows": [], "engine_settings": []}
    paper = pd.read_csv(PAPER)
    out["e2e_paper"] = paper[paper.layer == "ALL"].to_dict("records")
    answers = {}
    if not net_table.empty:
        nt = net_table[net_table.device != Device.CUDA_INTERPRET.value]
        keys = GroupKey.columns(layer=False) + ["sparsity"]
        compared = nt.groupby(keys)["pattern"].agg(lambda p: ", ".join(sorted(set(p))))
        for r in nt.loc[nt.groupby(keys)["speedup"].idxmax()].itertuples():
            k = tuple(getattr(r, c) for c in keys)
            answers[k] = {
                "machine": r.fp_hash[:6], "net": r.net, "sparsity": r.sparsity,
                "batch": r.batch, "dtype": r.dtype, "device": r.device, "pattern": r.pattern,
                "kernels": None, "plan": None, "estimate": r.speedup, "speedup": None,
                **NO_ENGINES,
                "compared": compared[k], "source": "bench: best configuration per layer, summed"}
    if not e2e.empty:
        interp = e2e.device == Device.CUDA_INTERPRET.value
        out["e2e_interpreted"] = e2e[interp].to_dict("records")
        e2e = e2e[~interp]
        ok = e2e[e2e.status == Status.OK]
        if len(ok):
            out["e2e_img"] = figures.e2e_bars(ok)
            keys = GroupKey.columns(layer=False) + ["sparsity"]
            compared = ok.groupby(keys + ["size"])["pattern"].agg(
                lambda p: ", ".join(sorted(set(p))))
            # the fastest pattern: against the best dense engine where engines ran (the same
            # baseline for every pattern of a key), else against eager; a network whose timing
            # is flagged (contended, or above the FLOP ideal after a re-measurement) is no answer
            ok = ok[~analysis.flagged(ok)]
            ok = ok.assign(rank=ok.speedup_best.fillna(ok.speedup))
            for r in (ok.loc[ok.groupby(keys + ["size"])["rank"].idxmax()].itertuples()
                      if len(ok) else ()):
                used = json.loads(r.kernels) if isinstance(r.kernels, str) else {}
                k = tuple(getattr(r, c) for c in keys)
                # a bench answer for the same key stays beside it when its pattern was not
                # measured end to end (the e2e answer only covers what it compared)
                old = answers.get(k)
                if old is not None and old["pattern"] in compared[k + (r.size,)].split(", "):
                    del answers[k]
                answers[k + (r.size,)] = {
                    "machine": r.fp_hash[:6], "net": r.net, "sparsity": r.sparsity,
                    "batch": r.batch, "dtype": r.dtype, "device": r.device,
                    "pattern": r.pattern + (" + sparse classifier" if r.classifier == 1
                                            else ""),
                    "compared": compared[k + (r.size,)],
                    "kernels": ", ".join(f"{kn} ({n})" for kn, n in used.items()) or None,
                    "plan": r.plan, "estimate": r.estimate, "speedup": r.speedup,
                    **{c: _nan_none(getattr(r, c)) for c in NO_ENGINES},
                    "source": f"e2e at {r.size}x{r.size}"}
        pairs = e2e.handover.map(lambda h: json.loads(h) if isinstance(h, str) else [])
        ends = e2e.residual.map(residual_fused)
        out["e2e_rows"] = e2e.assign(
            machine=e2e.fp_hash.str[:6], handover_pairs=pairs.map(len),
            classifier_label=e2e.classifier.map(lambda c: "sparse" if c == 1 else "dense"),
            handover_names=pairs.map(lambda p: ", ".join(
                f"{a} -> {b}" + (f" ({t[0] * 1e6:.0f} us)" if t else "") for a, b, *t in p)),
            handover_saved_ms=e2e.handover.map(handover_saved_s) * 1e3,
            residual_layers=ends.map(len), residual_names=ends.map(lambda p: ", ".join(
                n + (f" ({t[0] * 1e6:.0f} us)" if t else "") for n, *t in p)),
            in_network_names=e2e.in_network.map(_where),
            residual_saved_ms=e2e.residual.map(handover_saved_s) * 1e3,
            epilogue_saved_ms=(e2e.sparse_unfused_s - e2e.sparse_epilogue_s) * 1e3,
            conv_pool_saved_ms=(e2e.conv_pool.map(handover_saved_s) * 1e3
                                if "conv_pool" in e2e else None),
            images_per_call=e2e.batch_chunk.where(e2e.batch > 1).map(images_per_call),
            chunk_saved_ms=(e2e.sparse_whole_s - e2e.sparse_s) * 1e3,
        ).to_dict("records")
        out["engine_rows"], out["engine_settings"] = _engines(e2e)
    out["answer"] = sorted(answers.values(), key=lambda a: (a["net"], a["sparsity"],
                                                            a["batch"]))
    return out


def _where(in_network) -> str:
    """An e2e row's in-network breakdown as words: each kind's milliseconds, largest first."""
    if not isinstance(in_network, str):
        return ""
    times = json.loads(in_network)
    return ", ".join(f"{k} {t * 1e3:.2f} ms" for k, t in sorted(times.items(),
                                                                 key=lambda kv: -kv[1]))


def _interpreted(d: pd.DataFrame) -> list[dict]:
    """Interpreter rows: what passed the gate, with errors and density; no times."""
    if d.empty:
        return []
    d = d.assign(param=d.apply(_param_value, axis=1),
                 bad=d.status.map(lambda st: Status(st).failed))
    return d.sort_values(["net", "layer_index", "kernel", "sparsity"])[[
        "net", "layer", "shape", "kernel", "sparsity", "param", "status", "rel_err", "max_err",
        "density", "reason", "bad"]].to_dict("records")


def _plans(plans_dir) -> list[dict]:
    """The valid plans of the folder; each file that is not one is skipped with a warning that
    names it."""
    if not plans_dir or not Path(plans_dir).is_dir():
        return []
    plans = []
    for f in sorted(Path(plans_dir).glob("*.json")):
        try:
            plans.append({"file": f.name, **plan.load(f, check_kernels=False).to_dict()})
        except plan.PlanError as e:
            print(f"warning: skipping {f}: {e}", file=sys.stderr)
    return plans
