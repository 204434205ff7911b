"""Triton GPU kernels: CS weight-reuse, OVW feature-reuse, 1xN BSR, and a dense implicit GEMM.

All are implicit-GEMM convolutions over NCHW input (weights are encoded in ``prepare`` in the
weight's dtype, which is the input's; nothing is converted inside the timed call): a program
owns a tile of output pixels (flattened ``p = (n*OH + oh)*OW + ow``) and output channels; the
reduction runs over the im2col column ``r = (c*KH + kr)*KW + ks`` (OIHW order), whose input element is
``x[n, c, oh*S - P + kr, ow*S - P + ks]`` (zero outside the image). fp32 or fp16 inputs, fp32
accumulation; fp32 dots use IEEE precision (no TF32) so comparisons with cuDNN are fair.

Without a GPU, ``TRITON_INTERPRET=1`` runs them on CPU tensors (tests), and
``python -m harness verify --compile`` builds every configuration for sm_80/sm_90.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from . import patterns as P
from . import triton_configs as TC
from .registry import Kernel, Run, pick_divisor, register

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # non-Linux or a minimal install: kernels register but report why not
    HAVE_TRITON = False

PRUNED_FILE = Path(__file__).with_name("triton_pruned.json")


if HAVE_TRITON:

    @triton.jit
    def _store_out(y, acc, n, co, oh, ow, pmask, cmask, COUT, OH, OW):
        ptr = y + ((n[:, None] * COUT + co[None, :]) * OH + oh[:, None]) * OW + ow[:, None]
        tl.store(ptr, acc.to(y.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])

    @triton.jit
    def _im2col_load(x, r, rmask, n, oh, ow, pmask, C, H, W, STRIDE, PAD,
                     KH: tl.constexpr, KW: tl.constexpr):
        """[BM, BR] block of the implicit im2col matrix: pixel rows, columns ``r`` (OIHW
        order ``r = (c*KH + kr)*KW + ks``), zero outside the image and the masks."""
        c, t = r // (KH * KW), r % (KH * KW)
        ih = (oh * STRIDE - PAD)[:, None] + (t // KW)[None, :]
        iw = (ow * STRIDE - PAD)[:, None] + (t % KW)[None, :]
        m = pmask[:, None] & rmask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        return tl.load(x + ((n[:, None] * C + c[None, :]) * H + ih) * W + iw, mask=m, other=0.0)

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        """acc += a @ b; fp32 inputs in IEEE precision (no TF32) when IEEE is set."""
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def dense_igemm_kernel(x, wt, y, NB, C, H, W, COUT, OH, OW, R, STRIDE, PAD,
                           KH: tl.constexpr, KW: tl.constexpr, BM: tl.constexpr,
                           BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
        """Dense implicit GEMM (after torch inductor's conv template); wt is [R, COUT]."""
        p = tl.program_id(0) * BM + tl.arange(0, BM)
        co = tl.program_id(1) * BN + tl.arange(0, BN)
        pmask, cmask = p < NB * OH * OW, co < COUT
        n, q = p // (OH * OW), p % (OH * OW)
        oh, ow = q // OW, q % OW
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for r0 in range(0, R, BK):
            r = r0 + tl.arange(0, BK)
            a = _im2col_load(x, r, r < R, n, oh, ow, pmask, C, H, W, STRIDE, PAD, KH, KW)
            b = tl.load(wt + r[:, None] * COUT + co[None, :],
                        mask=(r < R)[:, None] & cmask[None, :], other=0.0)
            acc = _dot(a, b, acc, IEEE)
        _store_out(y, acc, n, co, oh, ow, pmask, cmask, COUT, OH, OW)

    @triton.jit
    def cs_weight_reuse_kernel(x, ws, idx, y, NB, C, H, W, COUT, OH, OW, MM, STRIDE, PAD,
                               KH: tl.constexpr, KW: tl.constexpr, K: tl.constexpr,
                               BM: tl.constexpr, BN: tl.constexpr):
        """CS (row form, MM = C*KH*KW/K): for each compressed slot m the K candidate input
        columns m + MM*k are loaded once for the pixel tile ([BM, K], weight reuse) and every
        output channel picks its candidate by index (n + M*Idx). ws/idx are [MM, COUT]."""
        p = tl.program_id(0) * BM + tl.arange(0, BM)
        co = tl.program_id(1) * BN + tl.arange(0, BN)
        pmask, cmask = p < NB * OH * OW, co < COUT
        n, q = p // (OH * OW), p % (OH * OW)
        oh, ow = q // OW, q % OW
        kk = tl.arange(0, K)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for m in range(0, MM):
            r = m + MM * kk  # the K candidate im2col columns of slot m
            xk = _im2col_load(x, r, kk < K, n, oh, ow, pmask, C, H, W, STRIDE, PAD, KH,
                              KW).to(tl.float32)
            wi = tl.load(idx + m * COUT + co, mask=cmask, other=0).to(tl.int32)
            wv = tl.load(ws + m * COUT + co, mask=cmask, other=0.0).to(tl.float32)
            if K == 2:  # Triton 3.6 fails to compile a gather over 2 columns for sm_90
                x0, x1 = tl.split(xk)
                sel = tl.where(wi[None, :] == 0, x0[:, None], x1[:, None])
            else:
                sel = tl.gather(xk, tl.broadcast_to(wi[None, :], (BM, BN)), axis=1)
            acc += sel * wv[None, :]
        _store_out(y, acc, n, co, oh, ow, pmask, cmask, COUT, OH, OW)

    @triton.jit
    def cs_direct_kernel(xp, offs, ws, y, NB, CHWP, WP, COUT, OH, OW, MM, STRIDE,
                         BM: tl.constexpr, BN: tl.constexpr, UNROLL: tl.constexpr,
                         SPLIT: tl.constexpr):
        """CS as an ELL gather: every output channel keeps MM weights, each with the offset of
        its input element in the zero-padded input ``xp`` (no bounds checks). The tile is
        [BN channels, BM pixels] so a warp's lanes read neighbouring pixels of one channel's
        kept element (coalesced), and no register gather is needed. UNROLL slots are read per
        step (independent loads in flight); SPLIT > 1 splits the MM slots over that many
        programs, which add their partial sums into the zeroed fp32 ``y`` (layers with few
        pixels and long rows would otherwise run on a handful of programs)."""
        p = tl.program_id(0) * BM + tl.arange(0, BM)
        co = tl.program_id(1) * BN + tl.arange(0, BN)
        pmask, cmask = p < NB * OH * OW, co < COUT
        n, q = p // (OH * OW), p % (OH * OW)
        oh, ow = q // OW, q % OW
        base = n * CHWP + (oh * STRIDE) * WP + ow * STRIDE
        both = cmask[:, None] & pmask[None, :]
        per = tl.cdiv(tl.cdiv(MM, SPLIT), UNROLL) * UNROLL
        m_lo = tl.program_id(2) * per
        m_hi = tl.minimum(m_lo + per, MM)
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        for m0 in range(m_lo, m_hi, UNROLL):
            for u in tl.static_range(UNROLL):
                m = m0 + u
                cm = cmask & (m + 0 * co < m_hi)
                off = tl.load(offs + m * COUT + co, mask=cm, other=0)
                wv = tl.load(ws + m * COUT + co, mask=cm, other=0.0).to(tl.float32)
                xv = tl.load(xp + off[:, None] + base[None, :],
                             mask=cm[:, None] & pmask[None, :], other=0.0)
                acc += xv.to(tl.float32) * wv[:, None]
        ptr = y + (n[None, :] * COUT + co[:, None]) * (OH * OW) + q[None, :]
        if SPLIT == 1:
            tl.store(ptr, acc.to(y.dtype.element_ty), mask=both)
        else:
            tl.atomic_add(ptr, acc, mask=both, sem="relaxed")

    @triton.jit
    def ovw_feature_reuse_kernel(x, cols, vals, perm, y, NB, C, H, W, COUT, OH, OW, KEEP,
                                 STRIDE, PAD, KH: tl.constexpr, KW: tl.constexpr,
                                 V: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                                 IEEE: tl.constexpr):
        """OVW: group g of V output channels walks its KEEP kept im2col columns; each input
        row is loaded once and feeds all V channels (dot of [BM, BK] by [BK, V])."""
        p = tl.program_id(0) * BM + tl.arange(0, BM)
        g = tl.program_id(1)
        v = tl.arange(0, V)
        pmask = p < NB * OH * OW
        n, q = p // (OH * OW), p % (OH * OW)
        oh, ow = q // OW, q % OW
        acc = tl.zeros((BM, V), dtype=tl.float32)
        for j0 in range(0, KEEP, BK):
            j = j0 + tl.arange(0, BK)
            jm = j < KEEP
            r = tl.load(cols + g * KEEP + j, mask=jm, other=0)
            a = _im2col_load(x, r, jm, n, oh, ow, pmask, C, H, W, STRIDE, PAD, KH, KW)
            b = tl.load(vals + (g * KEEP + j)[:, None] * V + v[None, :], mask=jm[:, None],
                        other=0.0)
            acc = _dot(a, b, acc, IEEE)
        oc = tl.load(perm + g * V + v)  # permuted channels return to their original place
        _store_out(y, acc, n, oc, oh, ow, pmask, v < V, COUT, OH, OW)

    @triton.jit
    def bsr_1xn_kernel(x, crow, colidx, vals, rowmap, y, NB, C, H, W, COUT, OH, OW, STRIDE, PAD,
                       KH: tl.constexpr, KW: tl.constexpr, N: tl.constexpr, BM: tl.constexpr,
                       BK: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
        """1xN BSR: block row b (N output channels) walks its kept columns like bsr_dense_mm,
        over implicit-im2col rows; tl.dot for N >= 16, an outer-product FMA path below."""
        p = tl.program_id(0) * BM + tl.arange(0, BM)
        b = tl.program_id(1)
        nn = tl.arange(0, N)
        pmask = p < NB * OH * OW
        n, q = p // (OH * OW), p % (OH * OW)
        oh, ow = q // OW, q % OW
        start = tl.load(crow + b)
        end = tl.load(crow + b + 1)
        acc = tl.zeros((BM, N), dtype=tl.float32)
        if USE_DOT:
            for j0 in range(start, end, BK):
                j = j0 + tl.arange(0, BK)
                jm = j < end
                r = tl.load(colidx + j, mask=jm, other=0)
                a = _im2col_load(x, r, jm, n, oh, ow, pmask, C, H, W, STRIDE, PAD, KH, KW)
                wv = tl.load(vals + j[:, None] * N + nn[None, :], mask=jm[:, None], other=0.0)
                acc = _dot(a, wv, acc, IEEE)
        else:
            for j in range(start, end):
                r = tl.load(colidx + j)
                c, t = r // (KH * KW), r % (KH * KW)
                ih = oh * STRIDE - PAD + t // KW
                iw = ow * STRIDE - PAD + t % KW
                m = pmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                xv = tl.load(x + ((n * C + c) * H + ih) * W + iw, mask=m, other=0.0)
                wv = tl.load(vals + j * N + nn)
                acc += xv.to(tl.float32)[:, None] * wv.to(tl.float32)[None, :]
        oc = tl.load(rowmap + b * N + nn)
        _store_out(y, acc, n, oc, oh, ow, pmask, nn < N, COUT, OH, OW)


def _pruned() -> dict:
    try:
        return json.loads(PRUNED_FILE.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _geom(layer, x):
    return (x.shape[0], layer.cin, layer.h, layer.w, layer.cout, layer.oh, layer.ow)


def _launch_opts(config):
    return {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}


class TritonKernel(Kernel):
    """A Triton kernel. Besides the registry's fields it carries what the ahead-of-time compile
    needs (``python -m harness verify --compile``): ``kernel_fn`` (the @triton.jit function's
    name), ``aot_pointers`` (pointer argument -> element type: ``D`` the data dtype, else a
    Triton type) and ``aot_specializations`` (the compile-time constants it is built for)."""

    device = "cuda"
    dtypes = ("float32", "float16")
    sources = ("triton_kernels.py", "triton_configs.py")
    tunables: dict = {}
    kernel_fn: str | None = None
    aot_pointers: dict[str, str] = {}

    def aot_specializations(self) -> list[dict]:
        """Constants beyond the tap size (KH, KW) that a compile is specialized on."""
        return [{}]

    def aot_pointer_type(self, name: str, dtype: str, tunable: dict) -> str | None:
        """The element type of pointer ``name`` where a configuration changes it, else None."""
        return None

    def available(self):
        if not HAVE_TRITON:
            return "triton is not installed"
        return super().available()

    def _reason(self, layer, sparsity, config):
        bad = _pruned().get(self.name, {}).get(json.dumps(self.tunable_part(config),
                                                          sort_keys=True))
        return f"configuration pruned by the AOT compile: {bad}" if bad else None

    def tunable_part(self, config):
        return {k: config[k] for k in self.tunables if k in config}

    def _io(self, layer, x, out):
        y = out if out is not None else torch.empty(x.shape[0], layer.cout, layer.oh, layer.ow,
                                                    device=x.device, dtype=x.dtype)
        return x.contiguous(), y

    def _wrap(self, layer, masked_weight, launch, info=None, perm=None):
        def call(x, out=None):
            if x.shape[1:] != (layer.cin, layer.h, layer.w):
                raise ValueError(f"{self.name}: input {tuple(x.shape)} does not match "
                                 f"{layer.shape_str}")
            x, y = self._io(layer, x, out)
            launch(x, y)
            return y

        return Run(masked_weight, call, info={"kernel": self.name, **(info or {})}, perm=perm)


@register
class DenseTritonImplicitGemm(TritonKernel):
    name = "dense_triton_implicit_gemm"
    pattern = "dense"
    tunables = TC.DENSE
    space = dict(TC.DENSE)
    kernel_fn = "dense_igemm_kernel"
    aot_pointers = {"x": "D", "wt": "D", "y": "D"}

    def _prepare(self, layer, weight, sparsity, config):
        R = layer.cin * layer.kh * layer.kw
        wt = weight.reshape(layer.cout, R).t().contiguous()
        BM, BN, BK = config["BM"], config["BN"], config["BK"]

        def launch(x, y):
            NB, C, H, W, CO, OH, OW = _geom(layer, x)
            grid = (triton.cdiv(NB * OH * OW, BM), triton.cdiv(CO, BN))
            dense_igemm_kernel[grid](x, wt, y, NB, C, H, W, CO, OH, OW, R,
                                     layer.stride, layer.padding, KH=layer.kh, KW=layer.kw,
                                     BM=BM, BN=BN, BK=BK, IEEE=x.dtype == torch.float32,
                                     **_launch_opts(config))

        return self._wrap(layer, weight, launch)


class _CSRowTriton(TritonKernel):
    """The CS Triton kernels: both read the row-form encoding (one kept of K per slot)."""

    pattern = "cs"

    def make_pattern(self, sparsity, config):
        return P.make("cs", sparsity, form="row")


@register
class CSTritonWeightReuse(_CSRowTriton):
    name = "cs_triton_weight_reuse"
    tunables = TC.CS
    space = dict(TC.CS)
    kernel_fn = "cs_weight_reuse_kernel"
    aot_pointers = {"x": "D", "ws": "D", "idx": "u8", "y": "D"}

    def aot_specializations(self):
        return [{"K": k} for k in (2, 4, 8, 16)]

    def _prepare(self, layer, weight, sparsity, config):
        wm, enc = self.make_pattern(sparsity, config).prune(weight)
        ws = enc.values.t().contiguous()  # [MM, COUT]: coalesced over output channels
        idx = enc.idx.t().contiguous()
        BM, BN = config["BM"], config["BN"]

        def launch(x, y):
            NB, C, H, W, CO, OH, OW = _geom(layer, x)
            grid = (triton.cdiv(NB * OH * OW, BM), triton.cdiv(CO, BN))
            cs_weight_reuse_kernel[grid](x, ws, idx, y, NB, C, H, W, CO, OH, OW,
                                         enc.M, layer.stride, layer.padding, KH=layer.kh,
                                         KW=layer.kw, K=enc.K, BM=BM, BN=BN,
                                         **_launch_opts(config))

        return self._wrap(layer, wm, launch, {"K": enc.K, "M": enc.M})


@register
class CSTritonDirect(_CSRowTriton):
    name = "cs_triton_direct"
    tunables = TC.CS_DIRECT
    space = dict(TC.CS_DIRECT)
    kernel_fn = "cs_direct_kernel"
    aot_pointers = {"xp": "D", "offs": "i32", "ws": "D", "y": "D"}

    def aot_pointer_type(self, name, dtype, tunable):
        """Split programs add into an fp32 output, whatever the data type."""
        return "fp32" if name == "y" and tunable.get("SPLIT", 1) > 1 else None

    def _default(self, layer, sparsity, pinned):
        return {"BM": 32, "BN": 32, "num_warps": 4, "num_stages": 1, "UNROLL": 4,
                "SPLIT": 1 if layer.oh * layer.ow >= 28 * 28 else 4}

    def _prepare(self, layer, weight, sparsity, config):
        wm, enc = self.make_pattern(sparsity, config).prune(weight)
        pad, taps = layer.padding, layer.kh * layer.kw
        hp, wp = layer.h + 2 * pad, layer.w + 2 * pad
        r = enc.positions()  # [COUT, MM]: the kept im2col column of each weight
        c, t = r // taps, r % taps
        offs = (c * hp * wp + (t // layer.kw) * wp + t % layer.kw).to(torch.int32).t().contiguous()
        ws = enc.values.t().contiguous()  # [MM, COUT], like offs
        BM, BN, U, SPLIT = config["BM"], config["BN"], config["UNROLL"], config["SPLIT"]

        def launch(x, y):
            NB, C, H, W, CO, OH, OW = _geom(layer, x)
            xp = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
            grid = (triton.cdiv(NB * OH * OW, BM), triton.cdiv(CO, BN), SPLIT)
            # split rows add into fp32 zeros (a workspace when y is fp16)
            dst = y if SPLIT == 1 else (y.zero_() if y.dtype == torch.float32 else
                                        torch.zeros(y.shape, device=y.device))
            cs_direct_kernel[grid](xp, offs, ws, dst, NB, C * hp * wp, wp, CO, OH, OW,
                                   ws.shape[0], layer.stride, BM=BM, BN=BN, UNROLL=U,
                                   SPLIT=SPLIT, **_launch_opts(config))
            if dst is not y:
                y.copy_(dst)

        return self._wrap(layer, wm, launch, {"K": enc.K, "M": enc.M})


@register
class OVWTritonFeatureReuse(TritonKernel):
    name = "ovw_triton_feature_reuse"
    pattern = "ovw"
    tunables = TC.OVW
    space = {"V": P.OVW_V, "permute": (False, True), **TC.OVW}
    pattern_params = ("V", "permute")
    kernel_fn = "ovw_feature_reuse_kernel"
    aot_pointers = {"x": "D", "cols": "i32", "vals": "D", "perm": "i32", "y": "D"}

    def aot_specializations(self):
        return [{"V": v} for v in self.space["V"]]

    def _default(self, layer, sparsity, pinned):
        return {"V": pick_divisor(P.OVW_V, layer.cout, 32), "permute": False,
                **{k: v[0] for k, v in TC.OVW.items()}}

    def _prepare(self, layer, weight, sparsity, config):
        wm, enc = self.make_pattern(sparsity, config).prune(weight)
        keep = enc.cols.shape[1]
        cols = enc.cols.contiguous()
        vals = enc.values.contiguous()
        perm = enc.perm.to(torch.int32).contiguous()
        BM, BK = config["BM"], config["BK"]

        def launch(x, y):
            NB, C, H, W, CO, OH, OW = _geom(layer, x)
            grid = (triton.cdiv(NB * OH * OW, BM), CO // enc.V)
            ovw_feature_reuse_kernel[grid](x, cols, vals, perm, y, NB, C, H, W, CO,
                                           OH, OW, keep, layer.stride, layer.padding,
                                           KH=layer.kh, KW=layer.kw, V=enc.V, BM=BM, BK=BK,
                                           IEEE=x.dtype == torch.float32,
                                           **_launch_opts(config))

        return self._wrap(layer, wm, launch, {"keep": keep}, perm=enc.perm)


@register
class Bsr1xNTriton(TritonKernel):
    name = "bsr_1xn_triton"
    pattern = "1xn"
    tunables = TC.BSR
    space = {"N": P.BLOCK_N, "rearrange": (False, True), **TC.BSR}
    pattern_params = ("N", "rearrange")
    kernel_fn = "bsr_1xn_kernel"
    aot_pointers = {"x": "D", "crow": "i32", "colidx": "i32", "vals": "D", "rowmap": "i32",
                    "y": "D"}

    def aot_specializations(self):
        return [{"N": n, "USE_DOT": n >= 16} for n in self.space["N"]]

    def _default(self, layer, sparsity, pinned):
        return {"N": pick_divisor(P.BLOCK_N, layer.cout, 16), "rearrange": False,
                **{k: v[0] for k, v in TC.BSR.items()}}

    def _prepare(self, layer, weight, sparsity, config):
        wm, enc = self.make_pattern(sparsity, config).prune(weight)
        crow = enc.crow.to(torch.int32).contiguous()
        col = enc.col.to(torch.int32).contiguous()
        vals = enc.values.contiguous()
        rowmap = enc.perm.to(torch.int32).contiguous()
        BM, BK = config["BM"], config["BK"]

        def launch(x, y):
            NB, C, H, W, CO, OH, OW = _geom(layer, x)
            grid = (triton.cdiv(NB * OH * OW, BM), CO // enc.N)
            bsr_1xn_kernel[grid](x, crow, col, vals, rowmap, y, NB, C, H, W, CO, OH,
                                 OW, layer.stride, layer.padding, KH=layer.kh, KW=layer.kw,
                                 N=enc.N, BM=BM, BK=BK, USE_DOT=enc.N >= 16,
                                 IEEE=x.dtype == torch.float32, **_launch_opts(config))

        return self._wrap(layer, wm, launch, {"nnzb": enc.nnzb}, perm=enc.perm)


def tunable_points(kernel) -> list[dict]:
    keys = list(kernel.tunables)
    return [dict(zip(keys, v)) for v in itertools.product(*(kernel.tunables[k] for k in keys))]
