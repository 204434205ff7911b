"""The correctness gate, before anything is timed: the deterministic inputs of a layer, the
pattern check of a kernel's masked weight, the float64 reference, the tolerances per dtype and
the one relative error every check uses (a case, a whole network, a CUDA graph's replay)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from shapes import ConvLayer

from .errors import error_text

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


def relative_error(got, want) -> float:
    """Relative L2 error of ``got`` against ``want``, ``||got - want|| / ||want||``, in float64
    on ``want``'s device: the one measure every check of the harness uses (the case gate, the
    network gate, the CUDA-graph replay check)."""
    want = want.double()
    return ((got.double().to(want.device) - want).norm() / want.norm().clamp_min(1e-30)).item()


def _errors(y, ref, bound):
    """(relative L2 error, worst element-wise error over its bound)."""
    diff = (y.double() - ref).abs()
    worst = (diff / bound).max().item() if diff.numel() else 0.0
    return relative_error(y, ref), worst


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


@dataclass(frozen=True)
class NetworkGate:
    """What the network gate found: the worst relative error over the variants checked, and
    for the first that failed, its name and why (``error``: the exception it raised running;
    None: it ran and its output is off)."""

    rel_err: float
    failed: str | None = None
    reason: str | None = None
    error: BaseException | None = None


def check_network(nets: dict, x, want, tol: float) -> NetworkGate:
    """Every network of ``{name: net}`` run on ``x`` must match ``want`` (the masked dense
    network's output in float64) to ``tol`` in relative L2 norm; the first that does not
    stops the check."""
    worst = 0.0
    for name, net in nets.items():
        try:
            got = net(x)
        except Exception as e:  # noqa: BLE001 - the caller types it
            return NetworkGate(worst, name, error_text(e), e)
        err = relative_error(got, want)
        if not err <= tol:
            what = "" if name == "sparse" else f" ({name.replace('_', ' ')})"
            return NetworkGate(err, name, f"network output{what} relative error {err:.3g} "
                                          f"exceeds {tol:g} against the masked dense network "
                                          f"(float64)")
        worst = max(worst, err)
    return NetworkGate(worst)
