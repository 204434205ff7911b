"""Build (first use) and load the C++ CPU kernels; builds are cached by torch under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), keyed by the source hash."""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path

from .registry import KernelBuildError

CSRC = Path(__file__).parent / "csrc"
_lock = threading.Lock()
_mod = None
_err: str | None = None


def cflags() -> list[str]:
    """-O3 -march=native; SPARSECONV_PORTABLE=1 builds for baseline x86-64-v2 instead (no AVX-512),
    which is how the portable path is tested on a machine that has AVX-512."""
    flags = ["-O3", "-fopenmp", "-std=c++17"]
    if os.environ.get("SPARSECONV_PORTABLE") == "1":
        flags.append("-march=x86-64-v2" if platform.machine() in ("x86_64", "AMD64") else "")
    elif platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    elif platform.machine() in ("aarch64", "arm64"):
        flags.append("-mcpu=native")
    return [f for f in flags if f]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load():
    """The compiled extension module (raises RuntimeError with the compiler's reason)."""
    global _mod, _err
    with _lock:
        if _mod is not None:
            return _mod
        if _err is not None:
            raise KernelBuildError(_err)
        from torch.utils import cpp_extension

        src = CSRC / "sparse_conv_cpu.cpp"
        # keyed by the source, the flags and this CPU's feature flags: -march=native means
        # another ISA on another CPU, so a shared home folder cannot hand one node's build to
        # another
        tag = hashlib.sha256(src.read_bytes() + " ".join(cflags()).encode()
                             + _cpu_flags().encode()).hexdigest()[:10]
        try:
            _mod = cpp_extension.load(
                name=f"sparseconv_cpu_{tag}", sources=[str(src)], extra_cflags=cflags(),
                extra_ldflags=["-fopenmp"], verbose=bool(os.environ.get("SPARSECONV_VERBOSE")))
        except Exception as e:  # compiler missing, flags unsupported, ...
            _err = f"C++ CPU kernels failed to build: {str(e).strip().splitlines()[-1][:300]}"
            raise KernelBuildError(_err) from e
        return _mod


def isa() -> str:
    return load().isa()
