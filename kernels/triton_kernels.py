"""Triton GPU kernels: CS weight-reuse and direct, OVW feature-reuse, 1xN BSR, and a dense control.

The sparse kernels are implicit-GEMM convolutions over NCHW input (weights are encoded in
``prepare`` in the weight's dtype, which is the input's; nothing is converted inside the timed
call): a program owns a tile of output pixels (flattened ``p = (n*OH + oh)*OW + ow``) and output
channels; the reduction runs over the im2col column ``r = (c*KH + kr)*KW + ks`` (OIHW order), whose
input element is ``x[n, c, oh*S - P + kr, ow*S - P + ks]`` (zero outside the image). The dense
control is torch inductor's convolution template: channels_last input, the reduction over
(tap, channel block) with contiguous channel loads, and a 1x1 stride-1 layer as a plain matrix
product. fp32 or fp16 inputs, fp32 accumulation; fp32 dots use IEEE precision (no TF32) so
comparisons with cuDNN (TF32 off) are fair.

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
    def dense_conv_nhwc_kernel(
            # pointers: x channels_last (channels innermost), w [KH, KW, C, COUT], y any
            # layout whose (oh, ow) pixels are evenly strided (NCHW or channels_last)
            x, w, y,
            # sizes
            NB, C, H, W, COUT, OH, OW, STRIDE, PAD,
            # strides of y in elements: batch, channel, pixel
            stride_yn, stride_yc, stride_yp,
            # meta-parameters
            KH: tl.constexpr, KW: tl.constexpr, MATMUL: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
        """Dense convolution as torch inductor's template writes it (the Triton control
        against cuDNN): channels_last input, one loop over (tap, channel block) with the
        channel block contiguous in memory; ``MATMUL`` (1x1, stride 1, no padding): the input
        is the [NB*H*W, C] matrix and the layer a plain matrix product."""
        # ---- map program ids: BM output pixels x BN output channels
        offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        mask_m, mask_n = offs_m < NB * OH * OW, offs_n < COUT
        n, q = offs_m // (OH * OW), offs_m % (OH * OW)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        # ---- loop: the reduction
        if MATMUL:
            for k in range(0, C, BK):
                offs_k = k + tl.arange(0, BK)
                mask_k = offs_k < C
                a = tl.load(x + offs_m[:, None] * C + offs_k[None, :],
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(w + offs_k[:, None] * COUT + offs_n[None, :],
                            mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = _dot(a, b, acc, IEEE)
        else:
            oh, ow = q // OW, q % OW
            k_blocks = tl.cdiv(C, BK)
            for ijk in range(0, KH * KW * k_blocks):
                k = (ijk % k_blocks) * BK
                tap = ijk // k_blocks
                ih = oh * STRIDE - PAD + tap // KW
                iw = ow * STRIDE - PAD + tap % KW
                offs_k = k + tl.arange(0, BK)
                mask_k = offs_k < C
                inside = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a = tl.load(x + ((n * H + ih) * W + iw)[:, None] * C + offs_k[None, :],
                            mask=inside[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(w + (tap * C + offs_k)[:, None] * COUT + offs_n[None, :],
                            mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = _dot(a, b, acc, IEEE)
        # ---- write back
        y_ptrs = y + (n * stride_yn + q * stride_yp)[:, None] + (offs_n * stride_yc)[None, :]
        tl.store(y_ptrs, acc.to(y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

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
    def cs_direct_kernel(x, taps, ws, y, NB, CHW, H, W, COUT, OH, OW, MM, STRIDE, PAD,
                         KW: tl.constexpr, HAS_PAD: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr, UNROLL: tl.constexpr, SPLIT: tl.constexpr):
        """CS as an ELL gather: every output channel keeps MM weights; ``taps`` holds, per
        weight, the offset of its input element from the pixel's window origin
        ``x[n, 0, oh*S - P, ow*S - P]`` (``c*H*W + kr*W + ks``, low 25 bits) and its tap
        ``kr*KW + ks`` (the bits above), so a padded layer reads the unpadded input and masks
        what falls outside the image (``HAS_PAD``; a layer without padding has no bounds
        checks). The tile is [BN channels, BM pixels] so a warp's lanes read neighbouring
        pixels of one channel's kept element (coalesced), and no register gather is needed.
        UNROLL slots are read per step (independent loads in flight); SPLIT > 1 splits the MM
        slots over that many programs, which add their partial sums into the zeroed fp32 ``y``
        (layers with few pixels and long rows would otherwise run on a handful of
        programs)."""
        p = tl.program_id(0) * BM + tl.arange(0, BM)
        co = tl.program_id(1) * BN + tl.arange(0, BN)
        pmask, cmask = p < NB * OH * OW, co < COUT
        n, q = p // (OH * OW), p % (OH * OW)
        oh, ow = q // OW, q % OW
        ih0, iw0 = oh * STRIDE - PAD, ow * STRIDE - PAD
        base = n * CHW + ih0 * W + iw0
        both = cmask[:, None] & pmask[None, :]
        per = tl.cdiv(tl.cdiv(MM, SPLIT), UNROLL) * UNROLL
        m_lo = tl.program_id(2) * per
        m_hi = tl.minimum(m_lo + per, MM)
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        for m0 in range(m_lo, m_hi, UNROLL):
            for u in tl.static_range(UNROLL):
                m = m0 + u
                cm = cmask & (m + 0 * co < m_hi)
                word = tl.load(taps + m * COUT + co, mask=cm, other=0)
                wv = tl.load(ws + m * COUT + co, mask=cm, other=0.0).to(tl.float32)
                mask_x = cm[:, None] & pmask[None, :]
                if HAS_PAD:
                    tap = word >> 25
                    ih = ih0[None, :] + (tap // KW)[:, None]
                    iw = iw0[None, :] + (tap % KW)[:, None]
                    mask_x = mask_x & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                xv = tl.load(x + (word & 0x1FFFFFF)[:, None] + base[None, :], mask=mask_x,
                             other=0.0)
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

    def aot_keep(self, spec: dict) -> bool:
        """Whether a specialization (tap size included) is one a layer can launch."""
        return True

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


def _matmul_layer(layer) -> bool:
    """A 1x1, stride-1, unpadded layer is a matrix product over channels_last pixels."""
    return (layer.kh, layer.kw, layer.stride, layer.padding) == (1, 1, 1, 0)


@register
class DenseTritonImplicitGemm(TritonKernel):
    """The Triton control against cuDNN, as torch inductor generates it for a convolution:
    channels_last in and out on the kernel-only path (NCHW end to end, converted around it,
    like cuDNN's channels_last layout), a 1x1 stride-1 layer as a matrix product."""

    name = "dense_triton_implicit_gemm"
    pattern = "dense"
    tunables = TC.DENSE
    space = dict(TC.DENSE)
    kernel_fn = "dense_conv_nhwc_kernel"
    aot_pointers = {"x": "D", "w": "D", "y": "D"}

    def aot_specializations(self):
        return [{"MATMUL": False}, {"MATMUL": True}]

    def aot_keep(self, spec):
        return not spec["MATMUL"] or (spec["KH"], spec["KW"]) == (1, 1)

    def _prepare(self, layer, weight, sparsity, config):
        w = weight.permute(2, 3, 1, 0).contiguous()  # [KH, KW, C, COUT]
        BM, BN, BK = config["BM"], config["BN"], config["BK"]
        matmul = _matmul_layer(layer)

        def to_layout(x):
            return x.contiguous(memory_format=torch.channels_last)

        def resident(xl, out=None):
            NB, C, H, W, CO, OH, OW = _geom(layer, xl)
            y = out if out is not None else torch.empty(
                NB, CO, OH, OW, device=xl.device, dtype=xl.dtype,
                memory_format=torch.channels_last)
            if y.stride(2) != OW * y.stride(3):
                raise ValueError(f"{self.name}: output strides {y.stride()} do not step evenly "
                                 f"over pixels (NCHW or channels_last)")
            grid = (triton.cdiv(NB * OH * OW, BM), triton.cdiv(CO, BN))
            dense_conv_nhwc_kernel[grid](xl, w, y, NB, C, H, W, CO, OH, OW, layer.stride,
                                         layer.padding, y.stride(0), y.stride(1), y.stride(3),
                                         KH=layer.kh, KW=layer.kw, MATMUL=matmul, BM=BM, BN=BN,
                                         BK=BK, IEEE=xl.dtype == torch.float32,
                                         **_launch_opts(config))
            return y

        def call(x, out=None):
            if x.shape[1:] != (layer.cin, layer.h, layer.w):
                raise ValueError(f"{self.name}: input {tuple(x.shape)} does not match "
                                 f"{layer.shape_str}")
            if out is None:
                out = torch.empty(x.shape[0], layer.cout, layer.oh, layer.ow, device=x.device,
                                  dtype=x.dtype)
            return resident(to_layout(x), out)

        return Run(weight, call, layout=to_layout, resident=resident,
                   info={"kernel": self.name, "matmul": matmul})


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
    aot_pointers = {"x": "D", "taps": "i32", "ws": "D", "y": "D"}

    def aot_pointer_type(self, name, dtype, tunable):
        """Split programs add into an fp32 output, whatever the data type."""
        return "fp32" if name == "y" and tunable.get("SPLIT", 1) > 1 else None

    def aot_specializations(self):
        return [{"HAS_PAD": True}, {"HAS_PAD": False}]

    def aot_keep(self, spec):
        return spec["KW"] > 1 or not spec["HAS_PAD"]

    def _reason(self, layer, sparsity, config):
        if layer.cin * layer.h * layer.w >= 1 << 25:
            return (f"{self.name}: an input of {layer.cin}x{layer.h}x{layer.w} elements per "
                    f"image does not fit its 25-bit offsets (< {1 << 25})")
        return super()._reason(layer, sparsity, config)

    def _default(self, layer, sparsity, pinned):
        return {"BM": 32, "BN": 32, "num_warps": 4, "num_stages": 1, "UNROLL": 4,
                "SPLIT": 1 if layer.oh * layer.ow >= 28 * 28 else 4}

    def _prepare(self, layer, weight, sparsity, config):
        wm, enc = self.make_pattern(sparsity, config).prune(weight)
        ntaps = layer.kh * layer.kw
        r = enc.positions()  # [COUT, MM]: the kept im2col column of each weight
        c, t = r // ntaps, r % ntaps
        off = c * layer.h * layer.w + (t // layer.kw) * layer.w + t % layer.kw
        taps = (off | (t << 25)).to(torch.int32).t().contiguous()  # [MM, COUT]
        ws = enc.values.t().contiguous()  # [MM, COUT], like taps
        BM, BN, U, SPLIT = config["BM"], config["BN"], config["UNROLL"], config["SPLIT"]

        def launch(x, y):
            NB, C, H, W, CO, OH, OW = _geom(layer, x)
            grid = (triton.cdiv(NB * OH * OW, BM), triton.cdiv(CO, BN), SPLIT)
            # split rows add into fp32 zeros (a workspace when y is fp16)
            dst = y if SPLIT == 1 else (y.zero_() if y.dtype == torch.float32 else
                                        torch.zeros(y.shape, device=y.device))
            cs_direct_kernel[grid](x, taps, ws, dst, NB, C * H * W, H, W, CO, OH, OW,
                                   ws.shape[0], layer.stride, layer.padding, KW=layer.kw,
                                   HAS_PAD=layer.padding > 0, BM=BM, BN=BN, UNROLL=U,
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
