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
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd

import kernels
import shapes

from .records import Status

SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block, opt-in max
DT = {"float32": "fp32", "float16": "fp16"}


def _ptxas_candidates() -> list[str]:
    import triton

    d = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return [str(d / n) for n in ("ptxas-blackwell", "ptxas") if (d / n).exists()]


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes as ptxas reports them (the first bundled ptxas that accepts
    Triton's PTX version)."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        for exe in _ptxas_candidates():
            r = subprocess.run([exe, "-v", f"--gpu-name={gpu}", str(src), "-o",
                                str(Path(d) / "k.o")], capture_output=True, text=True, timeout=300)
            if r.returncode == 0:
                break
        else:
            return {}
    text = r.stdout + r.stderr
    regs = re.findall(r"Used (\d+) registers", text)
    st = re.findall(r"(\d+) bytes spill stores", text)
    ld = re.findall(r"(\d+) bytes spill loads", text)
    return {"registers": int(regs[-1]) if regs else None,
            "spill_stores": int(st[-1]) if st else 0, "spill_loads": int(ld[-1]) if ld else 0}


_OP = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)")
_HEADER = re.compile(r"^(\$\w+):.*Loop Header: Depth=(\d+)")
_WIDTH = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "f16": 2, "bf16": 2, "u16": 2, "s16": 2,
          "b32": 4, "f32": 4, "u32": 4, "s32": 4, "b64": 8, "f64": 8, "u64": 8, "s64": 8,
          "b128": 16}


def _ops(lines) -> dict:
    """Global loads (instructions and bytes), asynchronous global-to-shared copies, FMAs and
    matrix instructions among PTX lines."""
    c = {"ld_global": 0, "ld_bytes": 0, "cp_async": 0, "fma": 0, "mma": 0}
    for line in lines:
        m = _OP.match(line)
        if not m:
            continue
        op = m.group(1)
        parts = op.split(".")
        if op.startswith("ld.global"):
            vec = next((int(p[1:]) for p in parts if p in ("v2", "v4", "v8")), 1)
            c["ld_global"] += 1
            c["ld_bytes"] += vec * next((_WIDTH[p] for p in reversed(parts) if p in _WIDTH), 4)
        elif op.startswith(("cp.async.ca.shared.global", "cp.async.cg.shared.global",
                            "cp.async.bulk.tensor")):
            c["cp_async"] += 1
            size = re.search(r",\s*(0x[0-9a-f]+|\d+)\s*(?:,|;)", line)
            c["ld_bytes"] += int(size.group(1), 0) if size and "bulk" not in op else 0
        elif op.startswith("fma."):
            c["fma"] += 2 if ("f16x2" in op or "bf16x2" in op) else 1
        elif op.startswith(("mma.", "wgmma.mma_async")):
            c["mma"] += 1
    return c


def ptx_loop_counts(ptx: str) -> dict:
    """The PTX counts of the kernel's hot loop, the one (LLVM marks loop headers) with the most
    FMAs and matrix instructions, innermost on a tie: global loads (``ld.global``
    instructions; ``cp.async`` copies into shared memory separately) per FMA, or per ``mma`` /
    ``wgmma`` where the loop has matrix instructions, and the bytes they load. Static counts of
    one iteration, so a change in tiling or vector width shows before any GPU runs it."""
    lines = ptx.splitlines()
    loops = []
    for i, line in enumerate(lines):
        h = _HEADER.match(line)
        if not h:
            continue
        label = h.group(1)
        ends = [j for j in range(i + 1, len(lines))
                if re.search(rf"\bbra(?:\.uni)?\s+{re.escape(label)};", lines[j])]
        if ends:
            loops.append((i, ends[-1], int(h.group(2))))
    best = None
    for i, j, depth in loops:
        c = _ops(lines[i:j + 1])
        key = (c["fma"] + 64 * c["mma"], depth)
        if best is None or key > best[0]:
            best = (key, c)
    c = best[1] if best else _ops(lines)
    loads = c["ld_global"] + c["cp_async"]
    per, what = (c["mma"], "mma") if c["mma"] else (c["fma"], "fma")
    return {"loop": "hot loop" if best else "whole kernel",
            **{f"loop_{k}": v for k, v in c.items()},
            "loads_per": what, "loads_per_op": round(loads / per, 3) if per else None,
            "bytes_per_op": round(c["ld_bytes"] / per, 2) if per else None}


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
