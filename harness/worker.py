"""Execute one case: prepare (untimed), the correctness gate (pattern structure, density, float64
reference), then interleaved timing against the dense baseline. Runs inside the runner's worker
process so a case that hangs or crashes can be killed without losing the sweep; requests and
replies are the typed messages of :mod:`harness.records`."""

from __future__ import annotations

import hashlib
import time
import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from shapes import ConvLayer

from . import baseline, gpu, timing
from .records import (
    CaseRequest,
    CaseResult,
    Device,
    E2ERequest,
    E2EResult,
    InitReply,
    InitRequest,
    KernelState,
    RaceReply,
    RaceRequest,
    Status,
    StopRequest,
    TimingOptions,
    WorkerFailure,
)

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


def status_of(exc: BaseException) -> Status:
    """The typed status of an exception raised while preparing or running a case."""
    if isinstance(exc, kernels.KernelBuildError):
        return Status.COMPILE_ERROR
    try:
        from triton.compiler.errors import CompilationError
    except ImportError:  # no triton: nothing of it can have raised
        return Status.RUNTIME_ERROR
    return Status.COMPILE_ERROR if isinstance(exc, CompilationError) else Status.RUNTIME_ERROR


def _err_text(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return msg[:500]


def reference(layer: ConvLayer, x, weight):
    return F.conv2d(x.double(), weight.double().to(x.device), stride=layer.stride,
                    padding=layer.padding, dilation=layer.dilation, groups=layer.groups)


@dataclass(frozen=True)
class Gate:
    """What the correctness gate found: errors, density, and why it failed (None: passed)."""

    rel_err: float
    max_err: float
    tolerance: float
    density: float | None
    reason: str | None


def check_pattern(kernel, run, sparsity, config) -> tuple[float | None, str | None]:
    """(density, reason or None): ``run.masked_weight`` must have the structure of the case's
    pattern (projecting it onto the pattern changes nothing; a permuting pattern is checked
    with the permutation the kernel reports in ``run.perm``) and as many non-zeros as the
    pattern keeps of a dense weight of that shape."""
    wm = run.masked_weight.detach().cpu().double()
    density = float((wm != 0).sum()) / wm.numel()
    if kernel.pattern == "dense":
        return density, None
    pat = kernel.make_pattern(sparsity, config)
    perm = run.perm.cpu() if run.perm is not None else None
    if pat.permutes and perm is None:
        return density, (f"non-conforming: {kernel.name} uses a permuting {pat.describe()} "
                         f"but its Run reports no permutation to check the mask with")
    ok = pat.conforms(wm, perm) if pat.permutes else pat.conforms(wm)
    if not ok:
        return density, (f"non-conforming: masked_weight does not have the structure of "
                         f"{pat.describe()}")
    want = int(pat.mask(torch.ones(wm.shape, dtype=torch.float64)).sum())
    have = int((wm != 0).sum())
    if have > want or have < 0.99 * want:
        return density, (f"non-conforming: masked_weight keeps {have} of {wm.numel()} weights "
                         f"(density {density:.4f}); {pat.describe()} keeps {want} "
                         f"(density {want / wm.numel():.4f})")
    return density, None


def _errors(y, ref, bound):
    """(relative L2 error, worst element-wise error over its bound)."""
    diff = (y.double() - ref).abs()
    rel = (diff.norm() / ref.norm().clamp_min(1e-30)).item()
    worst = (diff / bound).max().item() if diff.numel() else 0.0
    return rel, worst


def check_correct(layer, kernel, run, x, sparsity, config, dtype_name) -> Gate:
    """The correctness gate, before anything is timed. The masked weight must conform to the
    pattern; the output written into a NaN-poisoned ``out`` (and, for the kernel-only path, a
    poisoned ``out`` of its own) must match ``F.conv2d`` in float64 on the masked weight both
    in relative L2 norm and element by element: ``|y - ref| <= tol * (|x| conv |w|)``, a bound
    that scales with what each output element sums, so one dropped term or one zeroed element
    fails even in a large output."""
    # a kernel may declare a looser tolerance for what it is (cuDNN with TF32 on)
    tol = getattr(kernel, "tolerance", {}).get(dtype_name, TOLERANCE[dtype_name])
    density, why = check_pattern(kernel, run, sparsity, config)
    if why:
        return Gate(float("nan"), float("nan"), tol, density, why)
    ref = reference(layer, x, run.masked_weight)
    bound = tol * reference(layer, x.abs(), run.masked_weight.abs()).clamp_min(1e-30)
    errs, maxes = [], []
    paths = [("", lambda out: run(x, out=out))]
    if run.has_resident:
        xl = run.layout(x)
        paths.append(("kernel-only path: ", lambda out: run.resident(xl, out=out)))
    for label, call in paths:
        out = torch.full(ref.shape, float("nan"), dtype=x.dtype, device=x.device)
        y = call(out)
        if y is None or tuple(y.shape) != tuple(ref.shape):
            return Gate(float("nan"), float("nan"), tol, density, (
                f"{label}output shape {None if y is None else tuple(y.shape)} != "
                f"{tuple(ref.shape)}"))
        if y.data_ptr() != out.data_ptr():
            return Gate(float("nan"), float("nan"), tol, density,
                        f"{label}the kernel did not write into the out tensor it was given")
        rel, worst = _errors(out, ref, bound)
        errs.append(rel)
        maxes.append(worst)
        if torch.isnan(out).any():
            return Gate(rel, worst, tol, density,
                        f"{label}output contains NaN (an element was not written)")
        if rel > tol:
            return Gate(rel, worst, tol, density,
                        f"{label}relative error {rel:.3g} exceeds tolerance {tol:g}")
        if worst > 1.0:
            return Gate(rel, worst, tol, density,
                        f"{label}an output element is off by {worst:.3g}x its bound "
                        f"tol * (|x| conv |w|), tol {tol:g}")
    return Gate(max(errs), max(maxes), tol, density, None)


def gpu_settings(device: Device) -> None:
    """fp32 fairness on the GPU: cuDNN picks its fastest algorithm, and no TF32 anywhere."""
    if device is Device.CUDA:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def timed(device: Device, variants: dict, opts: TimingOptions, graphs: bool = True):
    """Interleaved timing on the device's clock (on a GPU, replays of CUDA graphs unless
    ``graphs`` is off). Under the interpreter the CPU clock with few, single-call rounds: a
    pipeline check, not a GPU timing."""
    if device is Device.CUDA:  # a round costs microseconds there: at least 25 of them
        return timing.interleaved_cuda(variants, rounds=max(opts.rounds, 25), graphs=graphs)
    if device is Device.CUDA_INTERPRET:
        return timing.interleaved_cpu(variants, rounds=min(opts.rounds, 3), min_sample=0.0,
                                      warmup=0.0, max_reps=1)
    return timing.interleaved_cpu(variants, rounds=opts.rounds, min_sample=opts.min_sample,
                                  warmup=opts.warmup,
                                  deadline=time.perf_counter() + opts.time_per_case)


def execute(req: CaseRequest) -> CaseResult:
    """Prepare (untimed), gate, then time a case interleaved with its dense baseline."""
    case, opts = req.case, req.timing
    layer, device = case.layer, case.device
    dtype = kernels.DTYPES[case.dtype]
    torch.set_num_threads(case.threads)
    gpu_settings(device)
    kern = kernels.get(case.kernel)
    config = dict(case.config)
    w, x = make_inputs(layer, case.batch, dtype, device.tensor_device)
    try:
        run = kern.prepare(layer, w, case.sparsity, config)
    except Exception as e:  # noqa: BLE001 - every failure is a typed record
        return CaseResult(status_of(e), "prepare: " + _err_text(e))
    try:
        gate = check_correct(layer, kern, run, x, case.sparsity, config, case.dtype)
    except Exception as e:  # noqa: BLE001
        return CaseResult(status_of(e), "run: " + _err_text(e))
    checked = {"rel_err": gate.rel_err, "max_err": gate.max_err, "tolerance": gate.tolerance,
               "density": gate.density}
    if gate.reason:
        return CaseResult(Status.INCORRECT, gate.reason, **checked)

    variants = {"kernel": (run, x)}
    if run.has_resident and opts.resident:
        variants["resident"] = (run.resident, run.layout(x))
    dense = req.dense
    if dense and case.kernel != dense.kernel:
        # end-to-end baseline: the dense layout fastest end-to-end; kernel-only baseline: the
        # layout fastest with its input already in that layout (often channels_last)
        dk = kernels.get(dense.kernel)
        try:
            drun = dk.prepare(layer, w, 0.0, {baseline.LAYOUT: dense.layout})
            krun = dk.prepare(layer, w, 0.0, {baseline.LAYOUT: dense.resident_layout})
        except Exception as e:  # noqa: BLE001
            return CaseResult(status_of(e), "dense baseline: " + _err_text(e), **checked)
        variants["dense"] = (drun, x)
        if opts.resident:
            variants["dense_resident"] = (krun.resident, krun.layout(x))
    watch = gpu.Watch() if device is Device.CUDA else None  # clocks, other processes
    try:
        got = timed(device, variants, opts)
    except Exception as e:  # noqa: BLE001
        return CaseResult(status_of(e), "timing: " + _err_text(e), **checked)
    st, samples = got
    k = st["kernel"]
    res = dict(median_s=k.median, iqr_s=k.iqr, min_s=k.min, noisy=k.noisy, reps=k.reps,
               samples=tuple(samples["kernel"]), timing_mode=got.mode.value,
               **(watch.finish() if watch else {}))
    r = st.get("resident", k)
    res.update(kernel_median_s=r.median, kernel_iqr_s=r.iqr,
               kernel_samples=tuple(samples["resident"]) if "resident" in st else ())
    if "dense" in st:
        dr = st.get("dense_resident")
        res.update(dense_median_s=st["dense"].median,
                   dense_kernel_median_s=dr.median if dr else None,
                   dense_layout=f"{dense.layout}/{dense.resident_layout}",
                   dense_samples=tuple(samples["dense"]))
    return CaseResult(Status.OK, None, **checked, **res)


def race(req: RaceRequest) -> RaceReply:
    """Time several candidates of one layer interleaved in one run. Each passes the correctness
    gate first; one that fails gets None and its reason."""
    layer, device = req.layer, req.device
    torch.set_num_threads(req.threads)
    gpu_settings(device)
    w, x = make_inputs(layer, req.batch, kernels.DTYPES[req.dtype], device.tensor_device)
    variants, reasons = {}, []
    for i, c in enumerate(req.cands):
        kern = kernels.get(c.kernel)
        S = 0.0 if kern.pattern == "dense" else req.sparsity
        try:
            run = kern.prepare(layer, w, S, dict(c.config))
            why = check_correct(layer, kern, run, x, S, dict(c.config), req.dtype).reason
        except Exception as e:  # noqa: BLE001
            run, why = None, _err_text(e)
        reasons.append(why)
        if why is None:
            variants[i] = (run, x)
    st, samples = timed(device, variants, req.timing)
    return RaceReply(medians=tuple(st[i].median if i in st else None
                                   for i in range(len(reasons))), reasons=tuple(reasons),
                     win_rates=tuple(win_rate(samples.get(i), samples.get(0))
                                     for i in range(len(reasons))))


def win_rate(mine, first) -> float | None:
    """The fraction of interleaved rounds (round r timed every variant once) in which ``mine``
    took less time than ``first``."""
    n = min(len(mine or ()), len(first or ()))
    return sum(a < b for a, b in zip(mine[:n], first[:n])) / n if n else None


def init(req: InitRequest) -> InitReply:
    """Load and build the kernels; say which cannot run here and why."""
    states = {}
    for name in req.kernels:
        kern = kernels.get(name)
        why = kern.available()
        if why:
            states[name] = KernelState(Status.UNSUPPORTED, why)
            continue
        try:
            kern.build()
            states[name] = KernelState(Status.OK)
        except Exception as e:  # noqa: BLE001
            states[name] = KernelState(status_of(e), _err_text(e))
    return InitReply(states)


def whole_network(req: E2ERequest) -> E2EResult:
    from .e2e import run_e2e  # the e2e engine uses this module's gate helpers and timing

    return run_e2e(req)


HANDLERS = {InitRequest: init, CaseRequest: execute, RaceRequest: race,
            E2ERequest: whole_network}


def serve(conn, parent_pid: int | None = None) -> None:
    """Worker loop: receive a request, reply with its typed result; ``StopRequest`` ends it.
    The process ends itself when ``parent_pid`` (the runner that started it) dies."""
    import signal

    from .interrupts import follow_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner decides when to stop
    if parent_pid is not None:
        follow_parent(parent_pid)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if isinstance(msg, StopRequest):
            return
        try:
            conn.send(HANDLERS[type(msg)](msg))
        except Exception as e:  # noqa: BLE001
            conn.send(WorkerFailure("worker: " + _err_text(e), traceback.format_exc()[-2000:]))
