"""Reading what the PTX assembler and the PTX itself say about a compiled Triton kernel:
registers and spills (the bundled ``ptxas -v``) and the hot loop's instruction counts. Used by
the ahead-of-time compile (:mod:`harness.aot`) and by :mod:`harness.capture`."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path


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
