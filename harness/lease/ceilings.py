"""The device's measured limits, so every later figure reads as a fraction of one: memory
bandwidth (a large device-to-device copy, bytes read plus written), the fp32 FMA rate (a Triton
kernel of independent FMA chains in registers) and the matrix rates through cuBLAS (fp16 on the
tensor cores, fp32 with TF32 on and with it off). Each is the best of several timed runs
(CUDA events). Under the interpreter the same code runs tiny sizes on the CPU clock: a pipeline
check whose numbers are not the GPU's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    @triton.jit
    def fma_chains_kernel(out, seed, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        """Eight independent FMA chains per element, ITERS steps each, in registers."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        a = offs.to(tl.float32) * 1e-7 + seed
        b = tl.full((BLOCK,), 0.999999, tl.float32)
        c = tl.full((BLOCK,), 1e-7, tl.float32)
        x0, x1, x2, x3 = a, a + 1.0, a + 2.0, a + 3.0
        x4, x5, x6, x7 = a + 4.0, a + 5.0, a + 6.0, a + 7.0
        for _ in range(ITERS):
            x0 = tl.fma(x0, b, c)
            x1 = tl.fma(x1, b, c)
            x2 = tl.fma(x2, b, c)
            x3 = tl.fma(x3, b, c)
            x4 = tl.fma(x4, b, c)
            x5 = tl.fma(x5, b, c)
            x6 = tl.fma(x6, b, c)
            x7 = tl.fma(x7, b, c)
        tl.store(out + offs, ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)))

    CHAINS = 8
except ImportError:  # pragma: no cover - a machine without Triton measures no FMA rate
    triton = None


@dataclass(frozen=True)
class Ceiling:
    name: str
    value: float
    unit: str
    how: str


def _best_seconds(fn, reps: int, cuda: bool) -> float:
    fn()  # warm-up: compiles, cuBLAS heuristics, clocks
    if cuda:
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return min(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _copy_seconds(n: int, dev: str, reps: int, cuda: bool) -> float:
    src = torch.rand(n, device=dev)
    dst = torch.empty_like(src)
    return _best_seconds(lambda: dst.copy_(src), reps, cuda)


def measure(interpreted: bool) -> list[Ceiling]:
    cuda = not interpreted
    dev = "cuda" if cuda else "cpu"
    out = []
    # memory bandwidth: one copy of 2 GiB (read + write) on a GPU, 16 MiB on the CPU
    n = (1 << 29) if cuda else (1 << 22)
    t = _copy_seconds(n, dev, 10 if cuda else 3, cuda)
    out.append(Ceiling("memory_bandwidth", 2 * n * 4 / t / 1e9, "GB/s",
                       f"copy of {n * 4 >> 20} MiB, bytes read + written"))
    # fp32 FMA rate: enough programs to fill every SM several times
    if triton is not None:
        if cuda:
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            block, iters, programs = 1024, 512, sms * 16  # ~0.3 s a run at 60 TFLOP/s
        else:
            block, iters, programs = 64, 4, 2
        buf = torch.empty(programs * block, device=dev)

        def fma():
            fma_chains_kernel[(programs,)](buf, 0.5, ITERS=iters, BLOCK=block,
                                           **({"num_warps": 8} if cuda else {}))

        t = _best_seconds(fma, 5 if cuda else 2, cuda)
        flops = 2 * CHAINS * iters * programs * block
        out.append(Ceiling("fp32_fma", flops / t / 1e12, "TFLOP/s",
                           f"Triton: {programs} programs x {block} lanes x {CHAINS} "
                           f"independent FMA chains x {iters} steps"))
    # matrix rates through cuBLAS (fp32 with TF32 off is the fp32 rows' fair peak)
    size = 8192 if cuda else 256
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype, tf32 in (("fp16_tensor_core_gemm", torch.float16, False),
                                  ("tf32_tensor_core_gemm", torch.float32, True),
                                  ("fp32_gemm", torch.float32, False)):
            if not cuda and dtype is torch.float16:
                dtype = torch.float32  # the CPU's half matmul is no ceiling of anything
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(size, size, device=dev, dtype=dtype)
            b = torch.randn(size, size, device=dev, dtype=dtype)
            t = _best_seconds(lambda a=a, b=b: torch.mm(a, b), 5 if cuda else 2, cuda)
            out.append(Ceiling(name, 2 * size**3 / t / 1e12, "TFLOP/s",
                               f"torch.mm {size}x{size}x{size} {str(dtype)[6:]}"
                               f"{', TF32 on' if tf32 else ''}"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return out
