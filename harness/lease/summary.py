"""The small summary a lease writes for ``results/published/``: one CSV row per figure (each
per-layer kernel against cuDNN, each tuned layer, each network end to end), every figure with
its fraction of the ceiling measured in the same lease, and a README naming the GPU, driver,
software, date and commit, with the issue's targets checked.

Per layer the ratio is the interleaved one (the kernel timed A B A B against cuDNN's faster
layout in the same case, kernel-only: input already in each side's layout); cuDNN's NCHW and
NHWC times and the Triton dense control's come from their own rows of the same group.
"""

from __future__ import annotations

import datetime as dt
import json

import pandas as pd

from ..records import Status, StepStatus

# the paper's V100 figures the issue sets as targets (CS: per layer, OVW V=64 at 90%: 2x)
CS_PAPER = {"layer1.0.conv3": 4.02, "layer2.0.conv2": 3.33, "layer4.0.conv2": 2.52}
OVW_TARGET = {"layer2.0.conv2": 2.0, "layer4.0.conv2": 2.0}
ELT = {"float32": 4, "float16": 2}


def _unit(kernel: str, dtype: str) -> str:
    """The ceiling a row is read against: the unit its arithmetic runs on."""
    if kernel == "dense_cudnn_tf32":
        return "tf32_tensor_core_gemm"
    if dtype == "float16" and not kernel.startswith("cs_"):
        return "fp16_tensor_core_gemm"  # tl.dot and cuDNN use the tensor cores in fp16
    return "fp32_fma"


def _min_bytes(r) -> float:
    """Each input read once, the kept weights once, each output written once."""
    e = ELT.get(r.dtype, 4)
    kept = 1.0 - (r.sparsity or 0.0)
    return e * (r.batch * r.cin * r.h * r.w + r.cout * r.cin * r.kh * r.kw * kept
                + r.batch * r.cout * r.out_pixels)


def layer_rows(m: pd.DataFrame, ceilings: dict) -> pd.DataFrame:
    """Step 4's figures: one row per measured kernel case."""
    if m.empty:
        return pd.DataFrame()
    m = m.copy()
    m["out_pixels"] = [(r.h + 2 * r.padding - r.kh) // r.stride + 1 for r in m.itertuples()]
    m["out_pixels"] *= [(r.w + 2 * r.padding - r.kw) // r.stride + 1 for r in m.itertuples()]
    ok = m[m.status == Status.OK.value]
    cudnn = ok[ok.kernel == "dense_cudnn"].assign(
        layout=lambda d: d.config.map(lambda c: json.loads(c)["layout"]))
    times = {}
    for r in cudnn.itertuples():
        times[(r.net, r.layer, r.batch, r.dtype, r.layout)] = r.kernel_median_s
    rows = []
    for r in m[m.kernel != "dense_cudnn"].itertuples():
        k = (r.net, r.layer, r.batch, r.dtype)
        t = r.kernel_median_s if r.kernel_median_s == r.kernel_median_s else r.median_s
        useful = r.flops * (1 - (r.sparsity or 0.0))
        unit = _unit(r.kernel, r.dtype)
        ceiling = ceilings.get(unit)
        bw = ceilings.get("memory_bandwidth")
        ok_row = r.status == Status.OK.value and t == t and t
        rows.append({
            "step": 4, "what": "layer", "net": r.net, "layer": r.layer, "shape": r.shape,
            "batch": r.batch, "dtype": r.dtype, "sparsity": r.sparsity, "kernel": r.kernel,
            "config": r.config, "status": r.status,
            "us": t * 1e6 if ok_row else None,
            "cudnn_nchw_us": _us(times.get(k + ("nchw",))),
            "cudnn_nhwc_us": _us(times.get(k + ("channels_last",))),
            "x_cudnn": r.dense_kernel_median_s / t if ok_row and r.dense_kernel_median_s
            else None,
            "tflops": useful / t / 1e12 if ok_row else None, "ceiling": unit,
            "frac_ceiling": useful / t / 1e12 / ceiling if ok_row and ceiling else None,
            "frac_bandwidth": _min_bytes(r) / t / 1e9 / bw if ok_row and bw else None,
            "timing_mode": r.timing_mode, "noisy": r.noisy,
            "reason": None if r.status == Status.OK.value else r.reason})
    return pd.DataFrame(rows)


def _us(seconds):
    return None if seconds is None or seconds != seconds else seconds * 1e6


def tuned_rows(lease: pd.DataFrame) -> pd.DataFrame:
    t = lease[lease.kind == "tuned"]
    rows = []
    for r in t.itertuples():
        d = json.loads(r.detail)
        rows.append({"step": 5, "what": "tuned", "layer": d["layer"], "batch": d["batch"],
                     "dtype": "float32", "sparsity": d["sparsity"], "kernel": d["kernel"],
                     "config": json.dumps(d["config"], sort_keys=True), "status": r.status,
                     "us": d["best_s"] * 1e6 if d.get("best_s") else None,
                     "x_cudnn": r.value,
                     "reason": d.get("note")})
    return pd.DataFrame(rows)


def e2e_rows(e: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in e.itertuples():
        base = {"step": 6, "net": r.net, "batch": r.batch, "dtype": r.dtype,
                "sparsity": r.sparsity, "kernel": r.pattern, "status": r.status,
                "reason": r.reason}
        rows.append({**base, "what": "network eager",
                     "us": r.sparse_s * 1e6 if r.sparse_s else None,
                     "cudnn_nchw_us": _us(r.dense_nchw_s), "cudnn_nhwc_us": _us(r.dense_cl_s),
                     "x_cudnn": r.speedup, "timing_mode": "eager"})
        rows.append({**base, "what": "network graph",
                     "us": r.sparse_graph_s * 1e6 if r.sparse_graph_s else None,
                     "x_cudnn": r.graph_speedup, "timing_mode": "graph",
                     "reason": r.graph_note or r.reason})
    return pd.DataFrame(rows)


def setup_rows(lease: pd.DataFrame) -> pd.DataFrame:
    """Steps 1-3 and 7 in brief: the ceilings, the tests' outcomes, the compiled kernels'
    registers and spills, and how each step ended."""
    rows = [{"step": 1, "what": "ceiling", "kernel": r.name, "value": r.value, "unit": r.unit,
             "status": r.status} for r in lease[lease.kind == "ceiling"].itertuples()]
    tests = lease[lease.kind == "test"]
    rows += [{"step": 2, "what": "tests", "status": st, "value": float(n), "unit": "tests"}
             for st, n in tests.status.value_counts().items()]
    comp = lease[lease.kind == "compile"]
    for kernel, g in comp.assign(kernel=comp.detail.map(lambda d: json.loads(d)["kernel"]),
                                 d=comp.detail.map(json.loads)).groupby("kernel") \
            if len(comp) else []:
        regs = [d.get("registers") for d in g.d if d.get("registers")]
        spills = sum(d.get("spill_stores") or 0 for d in g.d)
        rows.append({"step": 3, "what": "compile", "kernel": kernel, "status": StepStatus.OK.value if (
            g.status == Status.OK.value).all() else StepStatus.FAILED.value, "value": float(len(g)),
            "unit": "kernels", "reason": f"max registers {max(regs) if regs else '?'}, "
                                        f"spill stores {spills} B"})
    rows += [{"step": int(r.step), "what": "step", "kernel": r.name, "status": r.status,
              "value": r.value, "unit": "s"} for r in lease[lease.kind == "step"].itertuples()]
    return pd.DataFrame(rows)


def build(m: pd.DataFrame, e: pd.DataFrame, lease: pd.DataFrame, info: dict) -> pd.DataFrame:
    """Every figure of the lease, with the lease's identity on each row."""
    ceilings = {r.name: r.value for r in lease[lease.kind == "ceiling"].itertuples()}
    parts = [p for p in (setup_rows(lease), layer_rows(m, ceilings), tuned_rows(lease),
                         e2e_rows(e)) if len(p)]
    df = pd.concat(parts, ignore_index=True, sort=False) if parts else pd.DataFrame()
    for k in ("device", "gpu", "driver", "torch", "triton", "cudnn", "cuda", "commit", "date"):
        df[k] = info.get(k)
    return df


def targets(df: pd.DataFrame) -> list[str]:
    """The issue's targets for a GPU run, each with its measured figure."""
    out = []
    need = ("what", "layer", "batch", "dtype", "sparsity", "kernel", "config", "x_cudnn")
    if df.empty or any(c not in df for c in need) or not (df.what == "layer").any():
        return ["no per-layer figure was measured"]
    lay = df[(df.what == "layer") & (df.batch == 64) & (df.dtype == "float32")]
    cs = lay[(lay.kernel.str.startswith("cs_")) & ((lay.sparsity - 0.9375).abs() < 1e-9)]
    met = 0
    for name, paper in CS_PAPER.items():
        best = cs[cs.layer == name].x_cudnn.max()
        frac = cs[cs.layer == name].sort_values("x_cudnn").frac_ceiling.iloc[-1] \
            if (cs.layer == name).any() and "frac_ceiling" in cs else None
        ok = best == best and best is not None and best >= paper
        met += bool(ok)
        out.append(f"CS 93.75% fp32 batch 64 {name}: "
                   + (f"{best:.2f}x cuDNN ({_pct(frac)} of the FMA ceiling)" if best == best
                      and best is not None else "not measured")
                   + f"; paper (V100) {paper}x: {'met' if ok else 'not met'}")
    out.append(f"CS target (at least the paper's figure on two of three layers): "
               f"{'met' if met >= 2 else 'not met'} ({met} of 3)")
    ovw = lay[(lay.kernel == "ovw_triton_feature_reuse") & ((lay.sparsity - 0.9).abs() < 1e-9)
              & lay.config.map(lambda c: isinstance(c, str) and json.loads(c).get("V") == 64)]
    for name, want in OVW_TARGET.items():
        best = ovw[ovw.layer == name].x_cudnn.max()
        ok = best == best and best is not None and best >= want
        out.append(f"OVW V=64 90% fp32 batch 64 {name}: "
                   + (f"{best:.2f}x cuDNN's faster layout" if best == best and best is not None
                      else "not measured") + f"; target {want}x: {'met' if ok else 'not met'}")
    return out


def _pct(f) -> str:
    return "?" if f is None or f != f else f"{100 * f:.1f}%"


def readme(df: pd.DataFrame, info: dict, ceilings: list[dict], steps: list[dict]) -> str:
    interp = info.get("device") != "cuda"
    when = info.get("date") or dt.date.today().isoformat()
    lines = [f"# GPU lease results: {info.get('gpu') or 'no GPU'}, {when}", ""]
    if interp:
        lines += ["**Interpreter dry run (`--device cuda --interpret`): the GPU kernels ran "
                  "through Triton's interpreter on the CPU. These are pipeline checks, not GPU "
                  "timings: do not publish them.**", ""]
    lines += ["| | |", "|---|---|"]
    for k, label in (("gpu", "GPU"), ("driver", "driver"), ("cuda", "CUDA"),
                     ("cudnn", "cuDNN"), ("torch", "torch"), ("triton", "Triton"),
                     ("python", "Python"), ("commit", "commit"), ("date", "date"),
                     ("device", "device")):
        lines.append(f"| {label} | {info.get(k)} |")
    lines += ["", "## Measured ceilings", "", "| ceiling | value | how |", "|---|---|---|"]
    lines += [f"| {c['name']} | {c['value']:.4g} {c['unit']} | {c['how']} |" for c in ceilings]
    lines += ["", "## Steps", "", "| step | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {s['step']}. {s['name']} | {s['status']} | {s['seconds']:.0f} | "
              f"{s.get('note') or ''} |" for s in steps]
    lines += ["", "## Targets", ""] + [f"- {t}" for t in targets(df)]
    if not df.empty and "what" in df:
        show = df[(df.status == Status.OK.value) & df.what.isin(
            ["layer", "tuned", "network eager", "network graph"])][[c for c in (
            "what", "layer", "net", "batch", "dtype", "sparsity", "kernel", "us",
            "cudnn_nchw_us", "cudnn_nhwc_us", "x_cudnn", "frac_ceiling", "frac_bandwidth",
            "timing_mode") if c in df]]
        lines += ["", "## Figures (ok rows; every row with its configuration in summary.csv)",
                  "", show.round(3).to_markdown(index=False) if _has_tabulate() else
                  "```\n" + show.round(3).to_string(index=False) + "\n```"]
    lines += ["", "Copy this file and `summary.csv` to `results/published/<date>_<gpu>/` and "
              "commit them (`python -m harness lease --publish <out folder>` does the copy)."]
    return "\n".join(lines) + "\n"


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False
