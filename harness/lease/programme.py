"""What a GPU lease measures, as data: the layers, kernels and configurations of each step, and
the tiny stand-ins the interpreter's dry run uses in their place.

On a GPU: the CS paper's three ResNet50 layers, plus the OVW and 1xN kernels, at 90% and
93.75%, batch 1 and 64, fp32 (TF32 off) and fp16, each against cuDNN (NCHW and channels_last)
and the Triton dense control, with a cuDNN fp32 column with TF32 on; a budgeted batch-64 tuning
of ``cs_triton_direct`` and the OVW kernel on those layers; ResNet50 end to end at batch 1 and
64. Under ``--interpret`` (CI, no GPU): the same steps on layers small enough for Triton's
interpreter (same kernels, tap sizes, strides and padding), batch 1 and 2, each kernel's
default configuration and a few tuning candidates, a small network at 32x32.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import kernels
import shapes
from shapes import ConvLayer

from .. import cases
from ..autotune.tuner import candidates
from ..capture import CompileJob
from ..records import Candidate, Case, Config, Device
from ..sparse_model import default_kernel

PAPER_LAYERS = cases.QUICK_LAYERS  # layer1.0.conv3, layer2.0.conv2, layer4.0.conv2
SPARSITIES = (0.9, 0.9375)
# the sparse kernels of the per-layer step, with the pattern parameters pinned beside each
# default (the OVW target is V=64)
SPARSE = (("cs_triton_direct", {}), ("cs_triton_weight_reuse", {}),
          ("ovw_triton_feature_reuse", {}), ("ovw_triton_feature_reuse", {"V": 64}),
          ("bsr_1xn_triton", {}))
DENSE = (("dense_triton_implicit_gemm", {}), ("dense_cudnn_tf32", {"layout": "nchw"}),
         ("dense_cudnn_tf32", {"layout": "channels_last"}))
# tuned at batch 64 in fp32: kernel, its pattern, the sparsity
TUNED = (("cs_triton_direct", "cs", 0.9375), ("ovw_triton_feature_reuse", "ovw", 0.9))


def tiny_layers() -> list[ConvLayer]:
    """Stand-ins for the paper's three layers, small enough for the interpreter: the same tap
    sizes, strides and padding, channel counts every kernel supports (OVW V=64 included)."""
    def lay(name, index, cin, cout, k, stride, pad, h, w):
        return ConvLayer(net="tiny", name=name, index=index, cin=cin, cout=cout, kh=k, kw=k,
                         stride=stride, padding=pad, h=h, w=w)

    return [lay("layer1.0.conv3", 0, 16, 64, 1, 1, 0, 5, 6),
            lay("layer2.0.conv2", 1, 16, 64, 3, 2, 1, 7, 6),
            lay("layer4.0.conv2", 2, 32, 64, 3, 1, 1, 4, 3)]


@dataclass(frozen=True)
class Programme:
    device: Device
    layers: tuple
    groups: tuple  # (dtype, batch) of step 4, in the order they are measured
    sparsities: tuple = SPARSITIES
    tune_batch: int = 64
    tune_budget: int = 24  # screened configurations per kernel and layer (defaults extra)
    tune_seed: int = 0
    e2e_net: str = "resnet50"
    e2e_size: int = 224
    e2e_batches: tuple = (64, 1)  # batch 64 first: the papers' network figures are at 64
    e2e_patterns: tuple = (("cs", 0.9375),)
    tests: tuple = ()  # pytest arguments after the test file
    threads: int = 1
    # step number -> weight, where this programme's steps cost otherwise than a GPU lease's
    weights: dict = field(default_factory=dict)

    @property
    def interpreted(self) -> bool:
        return self.device.interpreted


def programme(device: Device, threads: int) -> Programme:
    if device.interpreted:  # about 3 minutes on two shared CI cores
        # OVW end to end: the interpreter runs the CS direct kernel's ELL gather ~20x slower
        return Programme(device=device, layers=tuple(tiny_layers()),
                         groups=(("float32", 2), ("float16", 1)),
                         tune_batch=2, tune_budget=1, e2e_net="resnet50_tiny", e2e_size=32,
                         e2e_batches=(2,), e2e_patterns=(("ovw", 0.9),),
                         tests=("-k", "channels_last or unpadded or registered"),
                         threads=threads,
                         # what each step costs on two CI cores: the compiles start processes
                         # that import torch and Triton; the interpreter's kernels are slow
                         weights={1: 5, 2: 30, 3: 50, 4: 90, 5: 60, 6: 65, 7: 5})
    by_name = {lay.name: lay for lay in shapes.unique(shapes.load("resnet50"))}
    return Programme(device=device, layers=tuple(by_name[n] for n in PAPER_LAYERS),
                     groups=(("float32", 64), ("float32", 1), ("float16", 64),
                             ("float16", 1)), threads=threads)


def bench_cases(p: Programme) -> list[Case]:
    """Step 4, most important first: per (dtype, batch) group (fp32 at batch 64 first), per
    layer, the cuDNN layouts (the baseline), the Triton dense control and the TF32 column, then
    every sparse kernel at each sparsity. A combination a kernel cannot run (CS at 90%, TF32 in
    fp16) stays a case with its reason."""
    out = []
    base = kernels.get("dense_cudnn")
    for dtype, batch in p.groups:
        for lay in p.layers:
            for cfg in ({"layout": "nchw"}, {"layout": "channels_last"}):
                out.append(_case(lay, base, 0.0, cfg, batch, dtype, p))
            for name, pinned in DENSE:
                out.append(_case(lay, kernels.get(name), 0.0, pinned, batch, dtype, p))
            for S in p.sparsities:
                for name, pinned in SPARSE:
                    out.append(_case(lay, kernels.get(name), S, pinned, batch, dtype, p,
                                     param=pinned))
    return out


def _case(lay, kern, S, pinned, batch, dtype, p, param=None) -> Case:
    cfg = kern.full_config(lay, S, pinned)
    why = cfg if isinstance(cfg, str) else kern.supports(lay, S, cfg, dtype)
    return cases.make_case(lay, kern, S, pinned if isinstance(cfg, str) else cfg, batch, dtype,
                           p.device, p.threads, param=param, reason=why)


@dataclass(frozen=True)
class TuneJob:
    """Step 5: one kernel tuned on one layer (its pattern's other kernels left out)."""

    kernel: str
    pattern: str
    sparsity: float
    layer: ConvLayer
    skip: tuple  # the pattern's other kernels

    def candidates(self, p: Programme) -> list[Candidate]:
        return candidates(self.layer, [self.pattern], self.sparsity, p.device, "float32",
                          self.skip)

    def screened(self, p: Programme) -> list[Candidate]:
        """The configurations the screen measures: the kernel's default and a seeded random
        sample of ``tune_budget`` (known before the lease times anything, so step 3 compiles
        them)."""
        cands = self.candidates(p)
        default = kernels.get(self.kernel).default_config(self.layer, self.sparsity)
        first = [c for c in cands if default is not None and c.config == Config(default)]
        rest = [c for c in cands if c not in first]
        return first + random.Random(p.tune_seed).sample(rest, min(p.tune_budget, len(rest)))


def tune_jobs(p: Programme) -> list[TuneJob]:
    out = []
    for name, pattern, S in TUNED:
        skip = tuple(n for n in kernels.names(device="cuda", pattern=pattern) if n != name)
        out += [TuneJob(name, pattern, S, lay, skip) for lay in p.layers]
    return out


def e2e_layers(p: Programme) -> list[ConvLayer]:
    """The distinct convolutions of step 6's network at its input size."""
    from shapes import models

    return shapes.unique(shapes.from_model(models.build(p.e2e_net), (3, p.e2e_size, p.e2e_size),
                                           net=p.e2e_net))


def compile_jobs(p: Programme) -> list[CompileJob]:
    """Step 3: every Triton launch the later steps will make, once each."""
    jobs = []
    for c in bench_cases(p):
        k = kernels.get(c.kernel)
        if c.unsupported is None and getattr(k, "kernel_fn", None):
            jobs.append(CompileJob(c.kernel, c.layer, c.batch, c.dtype, c.sparsity,
                                   dict(c.config)))
    for t in tune_jobs(p):
        jobs += [CompileJob(c.kernel, t.layer, p.tune_batch, "float32", t.sparsity,
                            dict(c.config)) for c in t.screened(p)]
    for pattern, S in p.e2e_patterns:
        for lay in e2e_layers(p):
            k, cfg, why = default_kernel(lay, pattern, S, p.device)
            if why is None and getattr(k, "kernel_fn", None):
                jobs += [CompileJob(k.name, lay, b, "float32", S, cfg) for b in p.e2e_batches]
    unique = {}
    for j in jobs:
        unique.setdefault((j.kernel, j.layer.shape_key, j.batch, j.dtype, j.sparsity,
                           Config(j.config)), j)
    return list(unique.values())


def compile_sample(jobs: list[CompileJob]) -> list[CompileJob]:
    """The dry run's share of step 3 (a compile takes seconds on a CI core): the first planned
    launch of each kernel."""
    seen, out = set(), []
    for j in jobs:
        if j.kernel not in seen:
            seen.add(j.kernel)
            out.append(j)
    return out


def stats_jobs() -> list[CompileJob]:
    """The launches ``verify --compile --stats`` reports on: the per-layer step's Triton kernels
    on the paper's three layers at batch 64, fp32 and fp16, no device check (the compile runs
    with a stand-in driver; a combination a kernel cannot run comes back unsupported)."""
    by_name = {lay.name: lay for lay in shapes.unique(shapes.load("resnet50"))}
    out = []
    for dtype in ("float32", "float16"):
        for name in PAPER_LAYERS:
            lay = by_name[name]
            out.append(CompileJob("dense_triton_implicit_gemm", lay, 64, dtype, 0.0, {}))
            for kernel, pinned in SPARSE:
                for S in SPARSITIES:
                    if kernel.startswith("cs_") and S != 0.9375:
                        continue  # CS needs K = 1/(1-S) to be a power of two
                    out.append(CompileJob(kernel, lay, 64, dtype, S, dict(pinned)))
    return out
