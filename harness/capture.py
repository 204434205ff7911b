"""Compile Triton kernels exactly as their launch would, without launching them.

Inside :func:`compiling`, every Triton launch takes Triton's own warm-up path (``warmup=True``):
the kernel is specialized on the real arguments (dtypes, 16-byte alignment and divisibility,
integers equal to 1), compiled with the launch's options into Triton's cache
(``TRITON_CACHE_DIR``) and not run. A stand-in driver names the target (``arch``, e.g. 90 for
sm_90, the H100/H200), so no GPU and no CUDA context is needed: a kernel's launcher runs on CPU
tensors of the real layer's shape, and the PTX, cubin, registers and shared memory are the ones
the GPU's own JIT builds for that layer. On a GPU machine the cache entries are the very ones
the later timed launches load (same source, specialization, options and target), so a lease
compiles every planned configuration in parallel before it times anything.

``python -m harness.capture --arch 90 --jobs 16 --in jobs.json --out rows.jsonl`` runs a list of
jobs in parallel processes and appends one JSON row per compiled kernel as it finishes (a run
cut short keeps what it compiled). Run it without ``TRITON_INTERPRET``: the interpreter has
nothing to compile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from shapes import ConvLayer


@dataclass(frozen=True)
class CompileJob:
    """One kernel configuration on one layer, batch and dtype."""

    kernel: str
    layer: ConvLayer
    batch: int
    dtype: str
    sparsity: float
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**asdict(self), "layer": asdict(self.layer)}

    @classmethod
    def from_json(cls, d: dict) -> CompileJob:
        return cls(**{**d, "layer": ConvLayer(**d["layer"])})


class _StandInDriver:
    """What Triton's JIT asks the active driver while it specializes and compiles: the target,
    a device index and a stream (never used: nothing is launched)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class _Compiling:
    def __init__(self, arch: int):
        self.arch = arch
        self.compiled: list = []  # (jit function name, CompiledKernel)

    def __enter__(self):
        from triton.runtime import jit
        from triton.runtime.driver import driver

        from kernels.triton_kernels import TritonKernel

        if os.environ.get("TRITON_INTERPRET") == "1":
            raise RuntimeError("capture compiles real GPU code: unset TRITON_INTERPRET")
        self._jit, self._driver = jit, driver
        self._run, self._available = jit.JITFunction.run, TritonKernel.available
        self._active = driver._active
        self._touched = set()
        compiled, touched = self.compiled, self._touched
        orig = self._run

        def warm(fn, *args, grid, warmup, **kwargs):
            touched.add(fn)
            kernel = orig(fn, *args, grid=grid, warmup=True, **kwargs)
            compiled.append((fn.__name__, kernel))
            return kernel

        jit.JITFunction.run = warm
        # the kernels run nowhere: no device needed to prepare them
        TritonKernel.available = lambda self: None
        driver.set_active(_StandInDriver(self.arch))
        return self

    def __exit__(self, *exc):
        from kernels.triton_kernels import TritonKernel

        self._jit.JITFunction.run = self._run
        TritonKernel.available = self._available
        self._driver._active = self._active
        for fn in self._touched:  # their binders were made for the stand-in's target
            fn.device_caches.clear()


def compiling(arch: int) -> _Compiling:
    """Context: Triton launches compile for sm_<arch> and return without running; the kernels
    compiled are appended to ``.compiled`` as ``(function name, CompiledKernel)``."""
    return _Compiling(arch)


def _launch(job: CompileJob, ctx: _Compiling) -> tuple[dict, list]:
    """Prepare the job's kernel on CPU tensors and call it (end to end, then kernel-only where
    it has that path): (its full configuration, [(path, compiled kernels so far)])."""
    import torch

    import kernels

    kern = kernels.get(job.kernel)
    S = 0.0 if kern.pattern == "dense" else job.sparsity
    why = kern.supports(job.layer, S, job.config, job.dtype)
    if why:
        raise ValueError(why)
    config = kern.full_config(job.layer, S, job.config)
    dtype = kernels.DTYPES[job.dtype]
    w = torch.randn(*kernels.weight_shape(job.layer)).to(dtype)  # the mask follows the values
    # the input's values are never read (nothing runs): its shape, dtype and alignment are
    x = torch.empty(job.batch, job.layer.cin, job.layer.h, job.layer.w, dtype=dtype)
    run = kern.prepare(job.layer, w, S, job.config)
    out = torch.empty(job.batch, job.layer.cout, job.layer.oh, job.layer.ow, dtype=x.dtype)
    run(x, out=out)
    marks = [("end to end", len(ctx.compiled))]
    if run.has_resident:  # the kernel-only path may launch another specialization
        run.resident(run.layout(x))
        marks.append(("kernel-only", len(ctx.compiled)))
    return config, marks


def compile_job(job: CompileJob, ctx: _Compiling, stats: bool = True) -> list[dict]:
    """Rows, one per Triton kernel the job's launches compiled (or one row saying why none)."""
    from . import ptx
    from .errors import error_text, status_of
    from .records import Status

    base = {"kernel": job.kernel, "layer": job.layer.name, "shape": job.layer.shape_str,
            "batch": job.batch, "dtype": job.dtype, "sparsity": job.sparsity,
            "config": json.dumps(job.config, sort_keys=True), "arch": ctx.arch}
    first = len(ctx.compiled)
    t0 = time.perf_counter()
    try:
        config, marks = _launch(job, ctx)
    except Exception as e:  # noqa: BLE001 - a typed row, never a lost one
        status = Status.UNSUPPORTED if isinstance(e, ValueError) else status_of(e)
        return [{**base, "status": status.value, "reason": error_text(e),
                 "seconds": time.perf_counter() - t0}]
    base["config"] = json.dumps(config, sort_keys=True)
    seconds = time.perf_counter() - t0
    rows, seen, lo = [], set(), first
    for path, hi in marks:
        for fn_name, ck in ctx.compiled[lo:hi]:
            lo = hi
            if id(ck) in seen:
                continue
            seen.add(id(ck))
            meta = ck.metadata
            row = {**base, "path": path, "function": fn_name, "status": Status.OK.value,
                   "seconds": seconds, "shared": int(meta.shared),
                   "num_warps": int(meta.num_warps), "num_stages": int(meta.num_stages)}
            if stats:
                row.update(ptx.ptxas_usage(ck.asm["ptx"], ctx.arch))
                row.update(ptx.ptx_loop_counts(ck.asm["ptx"]))
            rows.append(row)
        lo = hi
    return rows


_CTX: _Compiling | None = None


def _init(arch: int) -> None:
    global _CTX
    _CTX = compiling(arch).__enter__()


def _job(args) -> list[dict]:
    job, stats = args
    return compile_job(CompileJob.from_json(job), _CTX, stats)


def compile_jobs(jobs, arch: int, workers: int = 1, stats: bool = True, on_rows=None,
                 deadline: float | None = None) -> list[dict]:
    """Compile every job (``workers`` processes), calling ``on_rows(rows)`` as each finishes;
    jobs not started by ``deadline`` (``time.monotonic``) are left out."""
    # a key of Triton's cache: the lease's timed launches run with it set (as the tests do)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = []
    payload = [(j.to_json(), stats) for j in jobs]
    if workers <= 1:
        with compiling(arch) as ctx:
            for p in payload:
                if deadline is not None and time.monotonic() > deadline:
                    break
                rows = compile_job(CompileJob.from_json(p[0]), ctx, stats)
                out += rows
                if on_rows:
                    on_rows(rows)
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init,
                             initargs=(arch,)) as pool:
        futures = [pool.submit(_job, p) for p in payload]
        try:
            for f in as_completed(futures, timeout=None if deadline is None else max(
                    1.0, deadline - time.monotonic())):
                rows = f.result()
                out += rows
                if on_rows:
                    on_rows(rows)
        except TimeoutError:
            for f in futures:
                f.cancel()
    return out


def gpu_arch() -> int | None:
    """The compute capability of this machine's GPU as Triton names targets (90 for sm_90)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return major * 10 + minor
    except Exception:  # noqa: BLE001
        pass
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.capture", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--arch", type=int, default=None, help="default: this machine's GPU")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--in", dest="src", required=True, help="JSON list of CompileJob")
    p.add_argument("--out", required=True, help="JSON lines, one per compiled kernel")
    p.add_argument("--no-stats", action="store_true", help="skip ptxas and PTX counts")
    args = p.parse_args(argv)
    arch = args.arch or gpu_arch()
    if arch is None:
        print("error: no GPU here; name the target with --arch (e.g. 90)", file=sys.stderr)
        return 2
    with open(args.src) as f:
        jobs = [CompileJob.from_json(j) for j in json.load(f)]
    with open(args.out, "a") as sink:
        def write(rows):
            for r in rows:
                sink.write(json.dumps(r, default=str) + "\n")
            sink.flush()

        rows = compile_jobs(jobs, arch, args.jobs, stats=not args.no_stats, on_rows=write)
    from .records import Status

    bad = sum(r["status"] != Status.OK.value for r in rows)
    print(f"capture: {len(rows)} kernel(s) from {len(jobs)} job(s) for sm_{arch}, {bad} not ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
