"""Build (first use) and load the C++ CPU kernels: one shared library per kernel family.

Each family is one source file in ``csrc/`` (plus the headers it includes), built by
``torch.utils.cpp_extension`` into its own library and called through ``ctypes``: entry points
are ``extern "C"``, take raw pointers and a named ``sc_geometry`` struct (``Geometry`` in
``cpu_layout.py``), and return 0, or 1 with the reason in ``sc_last_error()``. A library's name
carries a tag hashed from its source, the headers it includes, the compiler flags, this CPU's
feature flags and where this interpreter's torch and Python headers are (each virtualenv builds
its own), so an edit rebuilds that family only, and a build cache shared between machines (a
cluster's common home folder) never hands one CPU's build to another.

Builds go under ``SPARSECONV_BUILD_DIR`` when it is set, else ``TORCH_EXTENSIONS_DIR``, else
``~/.cache/sparseconv``, one folder per library holding the sources it was built from; an OS
lock per library makes concurrent first builds safe, and a build killed midway blocks no one.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import re
import sysconfig
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from .registry import KernelBuildError

HERE = Path(__file__).parent
CSRC = HERE / "csrc"
_lock = threading.Lock()

P = ctypes.c_void_p  # a tensor's data pointer (passed as an int) or None
I64 = ctypes.c_int64
_F32 = torch.float32


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


def build_dir() -> Path:
    d = os.environ.get("SPARSECONV_BUILD_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(d) if d else Path.home() / ".cache" / "sparseconv"


def _includes(src: Path) -> list[Path]:
    """The project headers ``src`` includes, recursively (``#include "name"``)."""
    seen: list[Path] = []
    todo = [src]
    while todo:
        f = todo.pop()
        for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', f.read_text(), re.M):
            h = (f.parent / name).resolve()
            if h not in seen:
                seen.append(h)
                todo.append(h)
    return seen


@contextmanager
def _build_lock(where: Path):
    """Hold this library's build lock: an OS lock (``flock``) that ends with the process holding
    it. cpp_extension's own lock is a plain ``lock`` file that a build killed midway (Ctrl-C,
    SIGTERM, a lost node) leaves behind, after which every later process waits on it forever;
    every build here takes this lock first, so a ``lock`` file found while holding it is such a
    leftover and is removed."""
    with open(where / "build.flock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            (where / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


FAMILIES: list[Family] = []  # every family defined so far (the kernel modules define theirs)


class Family:
    """One kernel family's C++ library: ``source`` (relative to ``csrc/``) and its entry points
    with their ctypes argument types. ``sources`` are the files it is built from (relative to
    ``kernels/``, as ``Kernel.sources`` names them); ``load()`` builds on first use."""

    def __init__(self, name: str, source: str, entries: dict[str, list]):
        self.name, self.source, self.entries = name, CSRC / source, entries
        self._lib: ctypes.CDLL | None = None
        self._err: str | None = None
        FAMILIES.append(self)

    @property
    def sources(self) -> tuple[str, ...]:
        files = [self.source, *_includes(self.source)]
        return tuple(str(f.relative_to(HERE)) for f in files)

    @property
    def loaded(self) -> bool:
        return self._lib is not None

    def tag(self) -> str:
        h = hashlib.sha256()
        for f in [self.source, *_includes(self.source)]:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        h.update(" ".join(cflags()).encode() + _cpu_flags().encode())
        # the compile command names this interpreter's torch and Python headers: another
        # virtualenv gets its own library (built once) instead of rebuilding this one
        h.update(str(Path(torch.__file__).parent).encode()
                 + sysconfig.get_paths()["include"].encode())
        return h.hexdigest()[:10]

    def load(self) -> ctypes.CDLL:
        """The loaded library (raises KernelBuildError with the compiler's reason)."""
        with _lock:
            if self._lib is not None:
                return self._lib
            if self._err is not None:
                raise KernelBuildError(self._err)
            from torch.utils import cpp_extension

            name = f"sparseconv_{self.name}_{self.tag()}"
            where = build_dir() / name
            try:
                where.mkdir(parents=True, exist_ok=True)
                with _build_lock(where):
                    src = self._stage(where / "src")
                    path = cpp_extension.load(
                        name=name, sources=[str(src)], extra_cflags=cflags(),
                        extra_ldflags=["-fopenmp"], build_directory=str(where),
                        is_python_module=False,
                        verbose=bool(os.environ.get("SPARSECONV_VERBOSE")))
                lib = ctypes.CDLL(path)
            except Exception as e:  # compiler missing, flags unsupported, unwritable cache, ...
                lines = str(e).strip().splitlines() or [type(e).__name__]
                self._err = f"C++ CPU kernels ({self.name}) failed to build: {lines[-1][:300]}"
                raise KernelBuildError(self._err) from e
            lib.sc_last_error.restype = ctypes.c_char_p
            lib.sc_isa.restype = ctypes.c_char_p
            lib.sc_vector_width.restype = I64
            lib.sc_geometry_size.restype = I64
            if lib.sc_geometry_size() != ctypes.sizeof(GeometryC):
                self._err = (f"C++ CPU kernels ({self.name}): sc_geometry has "
                             f"{lib.sc_geometry_size()} bytes in common.h, "
                             f"{ctypes.sizeof(GeometryC)} in cpu_layout.Geometry")
                raise KernelBuildError(self._err)
            for fn, argtypes in self.entries.items():
                f = getattr(lib, fn)
                f.argtypes, f.restype = argtypes, ctypes.c_int
            self._lib = lib
            return lib

    def _stage(self, dest: Path) -> Path:
        """The source and its headers copied under the build folder, where the build reads
        them: the compile commands then name the same paths from every checkout of the same
        source (a worktree, a copied project, each Ray node's copy), so one checkout's use never
        makes ninja rebuild another's library. Returns the staged source."""
        for f in [self.source, *_includes(self.source)]:
            to = dest / f.relative_to(CSRC)
            data = f.read_bytes()
            if not to.exists() or to.read_bytes() != data:
                to.parent.mkdir(parents=True, exist_ok=True)
                tmp = to.with_name(f".{to.name}.{os.getpid()}")
                tmp.write_bytes(data)
                os.replace(tmp, to)
        return dest / self.source.relative_to(CSRC)

    def entry(self, fn: str):
        """Entry point ``fn`` (building the library on first use), to call with its argument
        types; it returns non-zero when it refused, then ``fail(fn)`` raises the reason."""
        return getattr(self._lib or self.load(), fn)

    def fail(self, fn: str):
        raise RuntimeError(f"{fn}: {self._lib.sc_last_error().decode()}")

    def call(self, fn: str, *args) -> None:
        if self.entry(fn)(*args):
            self.fail(fn)


@dataclass(frozen=True)
class Geometry:
    """What one kernel call computes, by name: the C++ ``sc_geometry`` in ``csrc/common.h``
    (same fields, same order, all int64). Output pixel (oh, ow) of channel c of image i goes to
    ``out_img*i + out_chan*c + out_base + out_row*oh + ow``, or, with ``out_s`` > 1, into a
    stride-``out_s`` consumer's phase planes (``CpuLayout.destination``)."""
    n: int             # images
    cin: int           # input channels
    cout: int          # output channels
    chan_stride: int   # floats between input channels in the resident layout
    img_stride: int    # floats between input images
    oh: int            # output rows
    ow: int            # output columns
    wq: int            # grid row width (columns >= ow are computed and discarded)
    tile: int          # vectors per pixel tile (T)
    ob: int            # output channels per work item
    chunk: int         # input channels a tile accumulates at once (0: all)
    split: int         # 0: threads own pixel tiles, 1: threads own output channels
    threads: int       # OpenMP threads
    out_img: int
    out_chan: int
    out_base: int
    out_row: int
    relu: int          # 1: ReLU in the epilogue
    # a stride-S consumer's phase-split layout (out_s > 1; common.h's sc_geometry): planes
    # out_na x out_nb of out_plane floats, its padding out_pad
    out_s: int = 1
    out_na: int = 1
    out_nb: int = 1
    out_plane: int = 0
    out_pad: int = 0

    @cached_property
    def c(self) -> ctypes.Structure:
        """The ctypes struct handed to the C++ entry points (built once per geometry)."""
        return GeometryC(*(getattr(self, f) for f, _ in GeometryC._fields_))

    @cached_property
    def ref(self):
        """A pointer to ``c``, as the entry points take it."""
        return ctypes.byref(self.c)

    @cached_property
    def out_extent(self) -> int:
        """One past the last output element a call writes (at most)."""
        last = (self.n - 1) * self.out_img + (self.cout - 1) * self.out_chan + self.out_base
        if self.out_s > 1:
            return last + self.out_na * self.out_nb * self.out_plane
        return last + (self.oh - 1) * self.out_row + self.ow

    @cached_property
    def in_extent(self) -> int:
        """Input floats a call reads."""
        return self.n * self.img_stride


class GeometryC(ctypes.Structure):
    _fields_ = [(name, I64) for name in Geometry.__dataclass_fields__]


GEO = ctypes.POINTER(GeometryC)


def check_io(x, y, geo: Geometry, name: str) -> None:
    """The buffers a call reads and writes are float32, contiguous, on the CPU and large enough
    (the C++ side trusts its pointers). One cheap test on the timed path; the reason only when
    it fails."""
    if (x.dtype is _F32 and y.dtype is _F32 and x.is_contiguous() and y.is_contiguous()
            and x.is_cpu and y.is_cpu and y.numel() >= geo.out_extent
            and x.numel() >= geo.in_extent):
        return
    for t, what in ((x, "input"), (y, "output")):
        if t.dtype is not _F32 or not t.is_contiguous() or not t.is_cpu:
            raise ValueError(f"{name}: the {what} must be a contiguous float32 CPU tensor")
    if y.numel() < geo.out_extent:
        raise ValueError(f"{name}: output buffer of {y.numel()} floats is smaller than its "
                         f"geometry ({geo.out_extent})")
    raise ValueError(f"{name}: input buffer of {x.numel()} floats is smaller than its "
                     f"geometry ({geo.in_extent})")


def bias_ptr(bias, geo: Geometry, name: str):
    """The bias' data pointer (None when empty), checked against the geometry."""
    if bias is None or bias.numel() == 0:
        return None
    if bias.dtype is not _F32 or not bias.is_contiguous() or bias.numel() != geo.cout:
        raise ValueError(f"{name}: bias must be a contiguous float32 [{geo.cout}] tensor")
    return bias.data_ptr()


def res_ptr(res, y, geo: Geometry, name: str):
    """The residual's data pointer (None when there is none), checked: a contiguous float32 CPU
    tensor laid out like the output ``y`` (the kernel reads it at each output element's own
    offset), which is not a stride-2 consumer's phase planes."""
    if res is None:
        return None
    if res.dtype is not _F32 or not res.is_contiguous() or not res.is_cpu \
            or res.shape != y.shape or geo.out_s > 1:
        raise ValueError(f"{name}: the residual must be a contiguous float32 CPU tensor shaped "
                         f"like the output {tuple(y.shape)}, not {tuple(res.shape)} "
                         f"({res.dtype}), and the output not phase-split")
    return res.data_ptr()


def need(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


LAYOUT = Family("layout", "layout.cpp", {
    "sc_layout_fill": [P, I64, I64, I64, I64, P, I64, I64, I64, I64, I64, I64, I64, I64],
    # x, N, C, H, W, K, S, padding, OH, OW, y, threads
    "sc_max_pool_nchw": [P, I64, I64, I64, I64, I64, I64, I64, I64, I64, P, I64],
    # x, weight, bias, y, K, N, M (images), threads
    "sc_linear_gemv": [P, P, P, P, I64, I64, I64, I64]})
PROBE = Family("probe", "probe.cpp", {
    "sc_loop_probe": [I64, I64, I64, I64, I64, ctypes.POINTER(ctypes.c_double)]})


def isa() -> str:
    """The vector path the kernels are built with on this machine (builds the layout library,
    the smallest, on first use)."""
    return LAYOUT.load().sc_isa().decode()


def vector_width() -> int:
    return int(LAYOUT.load().sc_vector_width())


@functools.cache
def avx512() -> bool:
    """Whether the kernels build with AVX-512 (16 lanes, 32 vector registers) on this machine,
    read from the CPU's flags without building anything: default configurations measured there
    keep more accumulators than an AVX2 build (16 registers) holds."""
    return (platform.machine() in ("x86_64", "AMD64") and "avx512f" in _cpu_flags().split()
            and os.environ.get("SPARSECONV_PORTABLE") != "1")


def lanes() -> int:
    """Floats per vector the kernels build with here (``vector_width`` without building)."""
    return 16 if avx512() else 8


def loop_probe(T: int, shift: int, ws_bytes: int, threads: int, fmas: int) -> float:
    """Seconds ``threads`` threads take for ``fmas`` vector FMAs each of the CS inner loop."""
    out = ctypes.c_double()
    PROBE.call("sc_loop_probe", T, shift, ws_bytes, threads, fmas, ctypes.byref(out))
    return out.value
