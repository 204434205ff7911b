"""Execute one case: prepare (untimed), correctness gate against the float64 reference, then
interleaved timing against the dense baseline. Runs inside the runner's worker process so a
case that hangs or crashes can be killed without losing the sweep."""

from __future__ import annotations

import hashlib
import time
import traceback

import torch
import torch.nn.functional as F

import kernels
from shapes import ConvLayer

from . import timing

TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}


def _seed(layer: ConvLayer, what: str) -> int:
    return int(hashlib.sha256(f"{layer.shape_key}{what}".encode()).hexdigest()[:8], 16)


def make_inputs(layer: ConvLayer, batch: int, dtype, device):
    """Deterministic random weight and non-zero input for a layer (same for every kernel)."""
    g = torch.Generator().manual_seed(_seed(layer, "w"))
    w = torch.randn(*kernels.weight_shape(layer), generator=g)
    g.manual_seed(_seed(layer, "x"))
    x = torch.rand(batch, layer.cin, layer.h, layer.w, generator=g) + 0.5  # no zeros
    x = x * torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)
    return w.to(device=device, dtype=dtype), x.to(device=device, dtype=dtype)


def _classify(exc: BaseException) -> str:
    name = type(exc).__name__.lower()
    text = str(exc)
    if "compil" in name or "failed to build" in text or "CompilationError" in text:
        return "compile_error"
    return "runtime_error"


def _err_text(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return msg[:500]


def reference(layer: ConvLayer, x, masked_weight):
    return F.conv2d(x.double(), masked_weight.double().to(x.device), stride=layer.stride,
                    padding=layer.padding, dilation=layer.dilation, groups=layer.groups)


def check_correct(layer, run, x, dtype_name):
    """(rel_err, tolerance, reason or None): NaN-poisoned output, float64 reference."""
    ref = reference(layer, x, run.masked_weight)
    out = torch.full(ref.shape, float("nan"), dtype=x.dtype, device=x.device)
    y = run(x, out=out)
    if y is None or tuple(y.shape) != tuple(ref.shape):
        return float("nan"), TOLERANCE[dtype_name], (
            f"output shape {None if y is None else tuple(y.shape)} != {tuple(ref.shape)}")
    tol = TOLERANCE[dtype_name]
    err = ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    if not err == err:  # NaN: some output element never written or computed NaN
        return err, tol, "output contains NaN (an element was not written)"
    if err > tol:
        return err, tol, f"relative error {err:.3g} exceeds tolerance {tol:g}"
    if run.has_resident:
        yl = run.resident(run.layout(x))
        e2 = ((yl.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        if not e2 <= tol:
            return e2, tol, f"resident path relative error {e2:.3g} exceeds tolerance {tol:g}"
        err = max(err, e2)
    return err, tol, None


def gpu_settings(device: str) -> None:
    """fp32 fairness on the GPU: cuDNN picks its fastest algorithm, and no TF32 anywhere."""
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def execute(case: dict, timing_opts: dict) -> dict:
    """Run a case to a measurement dict (fields of store.MEASUREMENT_COLUMNS)."""
    layer = ConvLayer(**case["layer"])
    dtype = kernels.DTYPES[case["dtype"]]
    device = case["device"]
    torch.set_num_threads(case["threads"])
    gpu_settings(device)
    res = {"status": None, "reason": None}
    kern = kernels.get(case["kernel"])
    w, x = make_inputs(layer, case["batch"], dtype, device)
    try:
        run = kern.prepare(layer, w, case["sparsity"], case["config"])
    except Exception as e:  # noqa: BLE001 - every failure is a typed record
        return {"status": _classify(e), "reason": "prepare: " + _err_text(e)}
    try:
        err, tol, why = check_correct(layer, run, x, case["dtype"])
    except Exception as e:  # noqa: BLE001
        return {"status": _classify(e), "reason": "run: " + _err_text(e)}
    res.update(rel_err=err, tolerance=tol)
    if why:
        res.update(status="incorrect", reason=why)
        return res

    variants = {"kernel": (run, x)}
    if run.has_resident and timing_opts.get("resident", True):
        variants["resident"] = (run.resident, run.layout(x))
    dense_layout = case.get("dense_layout")
    if case["kernel"] != case.get("dense_kernel") and dense_layout:
        # end-to-end baseline: the dense layout fastest end-to-end; kernel-only baseline: the
        # layout fastest with its input already in that layout (often channels_last)
        dk = kernels.get(case["dense_kernel"])
        drun = dk.prepare(layer, w, 0.0, {"layout": dense_layout})
        krun = dk.prepare(layer, w, 0.0, {"layout": case.get("dense_kernel_layout",
                                                             dense_layout)})
        variants["dense"] = (drun, x)
        if timing_opts.get("resident", True):
            variants["dense_resident"] = (krun.resident, krun.layout(x))
    try:
        if device == "cuda":
            st, samples = timing.interleaved_cuda(variants, rounds=timing_opts.get("rounds", 25))
        else:
            st, samples = timing.interleaved_cpu(
                variants, rounds=timing_opts.get("rounds", 7),
                min_sample=timing_opts.get("min_sample", 2e-3),
                warmup=timing_opts.get("warmup", 0.05),
                deadline=time.perf_counter() + timing_opts.get("time_per_case", 30.0))
    except Exception as e:  # noqa: BLE001
        return {"status": _classify(e), "reason": "timing: " + _err_text(e), **res}
    k = st["kernel"]
    res.update(status="ok", median_s=k.median, iqr_s=k.iqr, min_s=k.min, noisy=int(k.noisy),
               reps=k.reps, samples=samples["kernel"])
    if "resident" in st:
        res.update(kernel_median_s=st["resident"].median, kernel_iqr_s=st["resident"].iqr,
                   kernel_samples=samples["resident"])
    else:
        res.update(kernel_median_s=k.median, kernel_iqr_s=k.iqr)
    if "dense" in st:
        res.update(dense_median_s=st["dense"].median,
                   dense_kernel_median_s=st["dense_resident"].median if "dense_resident" in st
                   else None,
                   dense_layout=f"{dense_layout}/{case.get('dense_kernel_layout', dense_layout)}",
                   dense_samples=samples["dense"])
    return res


def race(spec: dict, timing_opts: dict) -> dict:
    """Time several (kernel, config, sparsity) candidates of one layer interleaved in one run:
    ``{"medians": [seconds or None per candidate], "reasons": [...]}``. Each candidate passes
    the correctness gate first; one that fails gets None and its reason."""
    layer = ConvLayer(**spec["layer"])
    dtype = kernels.DTYPES[spec["dtype"]]
    torch.set_num_threads(spec["threads"])
    gpu_settings(spec["device"])
    w, x = make_inputs(layer, spec["batch"], dtype, spec["device"])
    variants, reasons = {}, []
    for i, c in enumerate(spec["cands"]):
        try:
            run = kernels.get(c["kernel"]).prepare(layer, w, c["sparsity"], c["config"])
            _, _, why = check_correct(layer, run, x, spec["dtype"])
        except Exception as e:  # noqa: BLE001
            run, why = None, _err_text(e)
        reasons.append(why)
        if why is None:
            variants[i] = (run, x)
    if spec["device"] == "cuda":
        st, _ = timing.interleaved_cuda(variants, rounds=timing_opts.get("rounds", 25))
    else:
        st, _ = timing.interleaved_cpu(variants, rounds=timing_opts.get("rounds", 15),
                                       min_sample=timing_opts.get("min_sample", 2e-3),
                                       warmup=timing_opts.get("warmup", 0.05))
    return {"medians": [st[i].median if i in st else None for i in range(len(reasons))],
            "reasons": reasons}


def serve(conn) -> None:
    """Worker loop: receive ('init', kernel names) or ('case', case, opts); reply a dict."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner decides when to stop
    while True:
        try:
            msg = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if msg[0] == "stop":
            return
        try:
            if msg[0] == "init":
                reasons = {n: kernels.get(n).available() for n in msg[1]}
                conn.send({"ok": True, "reasons": reasons})
            elif msg[0] == "race":
                conn.send(race(msg[1], msg[2]))
            else:
                conn.send(execute(msg[1], msg[2]))
        except Exception as e:  # noqa: BLE001
            conn.send({"status": "runtime_error", "reason": "worker: " + _err_text(e),
                       "traceback": traceback.format_exc()[-2000:]})
