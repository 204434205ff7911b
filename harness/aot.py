"""Ahead-of-time compile of every Triton kernel configuration for real GPU targets, no GPU needed:
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` builds PTX and a cubin;
shared memory comes from the compiled metadata, registers and spills from ``ptxas -v`` (the
ptxas Triton ships). Configurations that fail or exceed the target's shared memory are recorded
in kernels/triton_pruned.json, which the registry reads to leave them out of the default space.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import time
from pathlib import Path

import pandas as pd

import kernels
import shapes

from .ptx import ptxas_usage
from .records import Status

SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block, opt-in max
DT = {"float32": "fp32", "float16": "fp16"}


def jit_function(kern):
    """The @triton.jit function a Triton kernel launches (``kernel_fn`` in its module)."""
    return getattr(importlib.import_module(type(kern).__module__), kern.kernel_fn)


def specializations(kern, nets=("resnet50", "vgg19")) -> list[dict]:
    """Compile-time constants the kernel is specialized on for the nets' unique shapes: the
    tap sizes, times what the kernel class declares (``aot_specializations``)."""
    taps = sorted({(lay.kh, lay.kw) for n in nets for lay in shapes.unique(shapes.load(n))})
    args = jit_function(kern).arg_names
    specs = [{k: v for k, v in {"KH": kh, "KW": kw, **e}.items() if k in args}
             for (kh, kw) in taps for e in kern.aot_specializations()
             if kern.aot_keep({"KH": kh, "KW": kw, **e})]
    return [dict(t) for t in dict.fromkeys(tuple(sp.items()) for sp in specs)]  # unique, in order


def compile_one(kern, tunable: dict, spec: dict, dtype: str, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = jit_function(kern)
    consts = {k: v for k, v in {**spec, **tunable}.items() if k in fn.arg_names}
    if "IEEE" in fn.arg_names:
        consts["IEEE"] = dtype == "float32"
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in kern.aot_pointers:
            t = kern.aot_pointer_type(name, dtype, tunable) or kern.aot_pointers[name]
            sig[name] = "*" + (DT[dtype] if t == "D" else t)
        else:
            sig[name] = "i32"
    row = {"kernel": kern.name, "arch": arch, "dtype": dtype, **spec,
           "config": json.dumps(tunable, sort_keys=True)}
    t0 = time.perf_counter()
    try:
        ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": tunable["num_warps"],
                                     "num_stages": tunable["num_stages"]})
    except Exception as e:  # noqa: BLE001 - recorded, then pruned
        row.update(status=Status.COMPILE_ERROR.value,
                   reason=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}")
        return row
    row.update(status=Status.OK.value, shared=int(ck.metadata.shared), seconds=time.perf_counter() - t0,
               **ptxas_usage(ck.asm["ptx"], arch))
    if row["shared"] > SMEM_LIMIT.get(arch, 101376):
        row.update(status=Status.COMPILE_ERROR.value,
                   reason=f"over shared memory: {row['shared']} bytes of shared memory > sm_{arch} limit "
                          f"{SMEM_LIMIT.get(arch)}")
    return row


def _compile_job(args):
    name, pt, spec, dt, arch = args
    return compile_one(kernels.get(name), pt, spec, dt, arch)


def compile_all(names=None, archs=(80, 90), dtypes=("float32", "float16"), nets=("resnet50",
                "vgg19"), sample: bool = False, jobs: int = 1, log=print) -> pd.DataFrame:
    from kernels.triton_kernels import tunable_points

    names = names or [n for n in kernels.names(device="cuda") if getattr(
        kernels.get(n), "kernel_fn", None) and getattr(kernels.get(n), "aot_pointers", None)]
    work = []
    for name in names:
        kern = kernels.get(name)
        points = tunable_points(kern)
        specs = specializations(kern, nets)
        if sample:  # CI: the first and last configuration, the most demanding specialization
            points, specs, dts = [points[0], points[-1]], [specs[-1]], dtypes[:1]
        else:
            dts = dtypes
        work += [(name, pt, spec, dt, arch)
                 for arch, dt, spec, pt in itertools.product(archs, dts, specs, points)]
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs) as pool:
            rows = list(pool.map(_compile_job, work, chunksize=4))
    else:
        rows = [_compile_job(w) for w in work]
    for r in rows:
        if r["status"] != Status.OK or os.environ.get("SPARSECONV_VERBOSE"):
            log(f"  {r['kernel']} sm_{r['arch']} {r['dtype']} {r['config']}: {r['status']} "
                f"{r.get('reason', '')}")
    return pd.DataFrame(rows)


def write_pruned(df: pd.DataFrame, path: Path | None = None) -> dict:
    """Configurations that failed anywhere, with the first reason, per kernel."""
    from kernels.triton_kernels import PRUNED_FILE

    pruned: dict = {}
    for _, r in df[df.status != Status.OK].iterrows():
        pruned.setdefault(r.kernel, {}).setdefault(r.config, f"sm_{r.arch} {r.dtype}: {r.reason}")
    (path or PRUNED_FILE).write_text(json.dumps(pruned, indent=1, sort_keys=True))
    return pruned


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    ok = df[df.status == Status.OK]
    g = df.groupby(["kernel", "arch"])
    out = pd.DataFrame({"compiled": g.size(),
                        "built": g.apply(lambda x: (x.status == Status.OK).sum())})
    if len(ok):
        og = ok.groupby(["kernel", "arch"])
        out = out.join(pd.DataFrame({"max shared KiB": og.shared.max() / 1024,
                                     "max registers": og.registers.max(),
                                     "spilling configs": og.apply(
                                         lambda x: (x.spill_stores > 0).sum())}))
    return out.reset_index()


def _short(config: str) -> str:
    names = {"num_warps": "w", "num_stages": "s", "UNROLL": "U", "SPLIT": "SPLIT",
             "permute": "perm", "rearrange": "rearr"}
    return " ".join(f"{names.get(k, k)}{v}" for k, v in json.loads(config).items())


def stats_table(arch: int, jobs: int = 1) -> pd.DataFrame:
    """Per Triton kernel and configuration the GPU lease launches on the paper's three layers
    at batch 64 (each kernel's default, OVW's V=64 too, fp32 and fp16), compiled for sm_<arch>
    exactly as the launch would (``harness.capture``): registers, shared memory, spills and the
    hot loop's PTX counts of global loads per FMA (or per ``mma``)."""
    from .capture import compile_jobs
    from .lease.programme import stats_jobs

    rows = compile_jobs(stats_jobs(), arch, workers=jobs)
    df = pd.DataFrame(rows)
    ok = df[df.status == Status.OK.value].copy()
    if ok.empty:
        return df
    ok["config"] = ok.config.map(_short) + ok.path.map(
        lambda p: " (kernel-only)" if p == "kernel-only" else "")
    return pd.DataFrame({
        "kernel": ok.kernel, "layer": ok.layer, "dtype": ok.dtype.map(DT), "S": ok.sparsity,
        "config": ok.config, "regs": ok.registers, "smem KiB": (ok.shared / 1024).round(1),
        "spill B": ok.spill_stores.fillna(0).astype(int) + ok.spill_loads.fillna(0).astype(int),
        "ld.global": ok.loop_ld_global, "cp.async": ok.loop_cp_async, "fma": ok.loop_fma,
        "mma": ok.loop_mma, "loads per": ok.loads_per, "loads/op": ok.loads_per_op,
        "B/op": ok.bytes_per_op}).sort_values(["kernel", "dtype", "layer", "S", "config"],
                                              kind="stable")


def run_cli(arch_text: str, nets, sample: bool = False, stats: bool = False) -> int:
    from . import UsageError

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise UsageError("--compile builds real GPU binaries: unset TRITON_INTERPRET")
    try:
        archs = tuple(int(a) for a in arch_text.split(","))
    except ValueError:
        raise UsageError(f"--arch {arch_text!r} must be numbers like 80,90") from None
    t0 = time.time()
    if stats:
        for arch in archs:
            table = stats_table(arch, jobs=os.cpu_count() or 1)
            out = Path("results") / f"aot_stats_sm{arch}.csv"
            out.parent.mkdir(exist_ok=True)
            table.to_csv(out, index=False)
            print(f"\nPer kernel and configuration built for sm_{arch} as the GPU lease launches "
                  f"it (paper layers, batch 64; hot loop's PTX counts, loads per FMA or per "
                  f"mma; -> {out}):")
            with pd.option_context("display.width", 250, "display.max_rows", None,
                                   "display.max_colwidth", 60):
                print(table.to_string(index=False))
    df = compile_all(archs=archs, nets=tuple(nets), sample=sample, jobs=os.cpu_count() or 1)
    out = Path("results") / "aot_compile.csv"
    out.parent.mkdir(exist_ok=True)
    df.to_csv(out, index=False)
    print("\nAhead-of-time Triton compile (no GPU):")
    print(summarize(df).round(1).to_string(index=False))
    if not sample:
        pruned = write_pruned(df)
        n = sum(len(v) for v in pruned.values())
        print(f"{n} configuration(s) pruned from the default space -> kernels/triton_pruned.json")
    print(f"{len(df)} compiles in {time.time() - t0:.0f} s; every row in {out}")
    return 0
