"""Machine and software fingerprint stored with every run, so results from different machines
or software never mix silently."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_ISA_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_tile", "avx2", "fma", "sse4_2", "neon", "asimd", "sve")
# What decides whether two measurements are comparable. The machine: hardware and the flags the
# C++ kernels are built with (the host name is recorded but two identical hosts are one
# machine). The software: versions of what runs the kernels. The kernels' own code enters each
# case's identity through its source hash (records.Case.key); the git commit and the hash of
# uncommitted changes are provenance only.
MACHINE = ("cpu", "cpu_flags_hash", "cores", "gpu", "gpu_driver", "kernel_build",
           "machine_label")
SOFTWARE = ("torch", "triton", "numpy", "python", "project")
IDENTITY = MACHINE + SOFTWARE
PROC_CPUINFO = Path("/proc/cpuinfo")


def _git(*args) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpuinfo_uncached() -> dict:
    try:
        import cpuinfo

        return cpuinfo.get_cpu_info()
    except Exception:  # py-cpuinfo can fail on exotic systems; fall back to platform
        return {}


def _cpuinfo() -> dict:
    """py-cpuinfo's answer, kept on disk beside the kernel builds: it runs itself in a
    subprocess and takes over a second, paid by every command (and by each of the test suite's
    hundred-odd). Keyed by this CPU's /proc/cpuinfo without its clock lines, so another CPU,
    core count or feature set asks again; where that file cannot be read, always asked."""
    try:
        text = PROC_CPUINFO.read_text()
    except OSError:
        return _cpuinfo_uncached()
    stable = "\n".join(ln for ln in text.splitlines() if not ln.startswith("cpu MHz"))
    key = hashlib.sha256(f"{platform.machine()}\n{_version('py-cpuinfo')}\n{stable}".encode()
                         ).hexdigest()[:16]
    from kernels._ext import build_dir

    path = build_dir() / f"cpuinfo-{key}.json"
    try:
        info = json.loads(path.read_text())
        if isinstance(info, dict) and info.get("flags"):
            return info
    except (OSError, ValueError):  # not cached yet, or unreadable: ask, and keep the answer
        pass
    info = _cpuinfo_uncached()
    if info.get("flags"):  # a whole answer only: a partial one is asked again next time
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, path)  # whole or absent, whoever reads it meanwhile
        except (OSError, TypeError, ValueError):
            pass
    return info


@functools.lru_cache(maxsize=1)
def _cpu() -> dict:
    info = _cpuinfo()
    flags = sorted(info.get("flags", []))
    return {"cpu": info.get("brand_raw") or platform.processor() or platform.machine(),
            "cpu_arch": info.get("arch_string_raw", platform.machine()),
            "cpu_hz": info.get("hz_advertised_friendly", ""),
            "cpu_isa": [f for f in _ISA_FLAGS if f in flags],
            "cpu_flags_hash": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12],
            "cores": os.cpu_count() or 1,
            "l2_cache": info.get("l2_cache_size", ""), "l3_cache": info.get("l3_cache_size", "")}


@functools.lru_cache(maxsize=1)
def _gpu() -> dict:
    out = {"gpu": None, "gpu_driver": None, "gpu_clocks_mhz": None, "gpu_count": 0}
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return out
    try:
        n = pynvml.nvmlDeviceGetCount()
        if n:
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(h)
            out.update(gpu=name.decode() if isinstance(name, bytes) else name, gpu_count=n,
                       gpu_driver=str(pynvml.nvmlSystemGetDriverVersion()),
                       gpu_clocks_mhz={
                           "sm_max": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                           "mem_max": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)})
    except Exception:
        pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out


def _version(mod: str) -> str | None:
    """The installed version, from the package's metadata where it has some (importing triton
    to ask costs half a second per command), else from the module."""
    from importlib import metadata

    try:
        return metadata.version(mod)
    except metadata.PackageNotFoundError:
        pass
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def _kernel_isa() -> str | None:
    """The ISA the C++ CPU kernels use, without building them (a build takes a minute, and a
    GPU lease has no minute to spare): the loaded extension's own answer where it is already
    built in this process, else what the compiler predefines under the kernels' flags
    (``c++ -dM -E``: the macros the kernel source tests), else None."""
    try:
        from kernels import _ext
    except Exception:
        return None
    if _ext.LAYOUT.loaded:
        return _ext.isa()
    try:
        cxx = os.environ.get("CXX", "c++")
        r = subprocess.run([cxx, *_ext.cflags(), "-dM", "-E", "-x", "c++", "-"], input="",
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    macros = set(re.findall(r"#define (\w+)", r.stdout))
    # the same choice as kernels/csrc/common.h's SC_ISA
    if "__AVX512F__" in macros:
        return "avx512"
    return "portable(avx2)" if "__AVX2__" in macros else "portable"


@functools.lru_cache(maxsize=1)
def kernel_build() -> str:
    """The compiler and flags the C++ kernels are built with (``-march=native`` resolves to this
    CPU's ISA, so a portable build is another machine)."""
    from kernels import _ext

    try:
        cxx = os.environ.get("CXX", "c++")  # what torch's cpp_extension builds with
        r = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=10)
        cc = r.stdout.splitlines()[0] if r.returncode == 0 and r.stdout else "no c++ compiler"
    except (OSError, subprocess.SubprocessError):
        cc = "no c++ compiler"
    return f"{cc}; {' '.join(_ext.cflags())}"


def _diff_hash() -> str | None:
    diff = _git("diff", "HEAD")
    return hashlib.sha256(diff.encode()).hexdigest()[:12] if diff else None


@functools.lru_cache(maxsize=1)
def fingerprint() -> dict:
    import harness

    fp = {**_cpu(), **_gpu(), "os": platform.platform(), "python": platform.python_version(),
          "torch": _version("torch"), "triton": _version("triton"), "numpy": _version("numpy"),
          "project": harness.__version__, "git_commit": _git("rev-parse", "HEAD"),
          "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
          "git_diff_hash": _diff_hash(), "kernel_isa": _kernel_isa(),
          "kernel_build": kernel_build(), "hostname": platform.node(),
          # SPARSECONV_MACHINE_LABEL tells apart machines that look alike but are not (another
          # BIOS power setting, another cooling): rows under different labels never mix
          "machine_label": os.environ.get("SPARSECONV_MACHINE_LABEL") or None}
    return fp


def _hash(fp: dict, keys) -> str:
    return hashlib.sha256(json.dumps({k: fp.get(k) for k in keys}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


def identity_hash(fp: dict) -> str:
    """Machine and software: rows and tuning records are reused only under the same one."""
    return _hash(fp, IDENTITY)


def machine_hash(fp: dict) -> str:
    """The hardware and the kernels' build flags alone (for grouping machines in reports)."""
    return _hash(fp, MACHINE)


def measured_peak_gflops(threads: int, device: str = "cpu", n: int = 2048) -> float:
    """Achieved fp32 GEMM GFLOP/s on this machine (the roofline view's ceiling), best of 5."""
    import time

    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        best = float("inf")
        for _ in range(6):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.mm(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return 2 * n**3 / best / 1e9
    finally:
        torch.set_num_threads(old)
