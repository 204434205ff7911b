"""Drop-in sparse models: ``harness.sparsify(model, pattern, sparsity, plan=None, device="cpu")``.

Returns a copy of ``model`` in eval mode in which every ``nn.Conv2d`` the pattern can handle runs
a harness kernel (the plan's kernel and configuration for its shape, or the kernel and default
configuration the harness would pick), BatchNorms that directly follow a convolution are folded
into it (the mask is chosen on the folded weight, as deployed), and every other convolution stays
dense with the reason. ``dense_folded(model)`` is the same network with BN folded and nothing
masked: the dense baseline. ``masked_dense(sparse)`` puts each replacement's ``masked_weight``
back into plain convolutions: the reference the sparse network must match. ``fuse_layers``
(applied by ``sparsify`` unless ``fuse=False``) moves biases, ReLUs and residual additions into
the C++ kernels' epilogues and lets consecutive sparse layers hand activations over in the
kernel's own layout, and (batch above 1) runs a batch a few images at a time where that was
measured faster (:class:`BatchChunks`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import operator
import threading
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

import kernels
import shapes
from kernels.cpu_common import ThreadBuffers
from kernels.cpu_layout import GEMV_MAX_ROWS, CpuLayout, max_pool_args, square

from .plan import Plan, PlanError
from .records import Device


class SparsifyError(ValueError):
    """A plan or argument that cannot be applied (the CLI prints it as one line)."""


SIZES_KEPT = 8  # input sizes a layer keeps prepared kernels for, besides its own (LRU)


_PREPARING = threading.Lock()  # a layer preparing its kernel for another input size


class SparseConv2d(nn.Module):
    """A convolution computed by a harness kernel (``run``), plus the folded bias.

    Made by :func:`fuse_layers` (C++ CPU kernels only): ``epilogue`` adds the bias in the kernel,
    ``residual`` means the layer ends a residual block: ``forward(x, residual)`` adds the
    shortcut there too, ``relu`` applies the ReLU that followed the convolution (or the
    addition) there too, ``laid_in`` means the
    input arrives already in this kernel's layout and ``dest`` (the next layer's layout) that
    the output is written straight into it.

    ``run`` is prepared for ``layer``'s input size (``sparsify``'s ``input_size``). An input of
    another height and width gets the same kernel prepared for that size on first use, from
    ``masked_weight`` (so the same weights and mask at every size), with ``config`` where the
    kernel supports it there, else the kernel's default with the same pattern parameters; where
    neither reproduces ``masked_weight`` exactly, the layer runs as a dense convolution over it.
    At such a size there is no layout handover (the output is NCHW, or channels-last from a
    channels-last kernel's epilogue, ``cs_cpu_nhwc``); the last ``SIZES_KEPT`` sizes stay
    prepared."""

    def __init__(self, layer: shapes.ConvLayer, run, bias, kernel: str, config: dict,
                 epilogue=False, relu=False, laid_in=False, dest=None, sparsity=None,
                 tuned_at=None, residual=False):
        super().__init__()
        self.layer, self.run, self.kernel, self.config = layer, run, kernel, dict(config)
        self.register_buffer("masked_weight", run.masked_weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.epilogue, self.relu, self.laid_in, self.dest = epilogue, relu, laid_in, dest
        self.residual = residual
        self.sparsity, self.tuned_at = sparsity, tuned_at
        # a direct (NCHW) layout is what a producer hands over as a 4-D tensor; any other layout
        # arrives as a 2-D buffer, so a 4-D input of the layer's own size is plain NCHW
        self._direct_in = laid_in and self.in_layout.direct
        # buffers in ``dest``'s layout (their padding stays zero), per calling thread and batch
        self._out = None if self.dest is None else ThreadBuffers(self.dest.empty)
        self._sizes: OrderedDict = OrderedDict()  # (h, w) -> (run, how), other input sizes

    @property
    def in_layout(self) -> CpuLayout | None:
        """The planar input layout the layer's kernel reads (a producer handing over writes it):
        the run's own (an aligned-row kernel's differs from the layer's plain layout); None for
        a kernel that reads plain tensors (``cs_cpu_nhwc``: channels-last), which nothing hands
        a layout over to or from."""
        return self.run.cpu_layout

    def fused_copy(self, **fusion) -> SparseConv2d:
        """The same layer (same run and weights) with the given fusion added to what it already
        fuses (fusing a fused model again keeps a ReLU whose node is gone)."""
        now = {"relu": self.relu, "laid_in": self.laid_in, "dest": self.dest,
               "residual": self.residual}
        return type(self)(self.layer, self.run, self.bias, self.kernel, self.config,
                          epilogue=True, sparsity=self.sparsity, tuned_at=self.tuned_at,
                          **{**now, **fusion})

    def forward(self, x, residual=None):
        L = self.layer
        if x.dim() == 4 and (x.shape[2], x.shape[3]) != (L.h, L.w):
            return self._other_size(x, residual)
        if residual is not None and not self._fits(residual, x.shape[0]):
            if self.dest is not None:
                raise ValueError(f"{L.shape_str}: a residual is added to NCHW output only, not "
                                 f"to the next layer's layout")
            return self._add(self._conv(x, False), residual, self.epilogue and self.relu)
        return self._conv(x, self.relu, residual)

    def _conv(self, x, relu, residual=None):
        """The layer at its own input size; ``relu`` (an epilogue's) and ``residual`` (one that
        ``_fits``) in the kernel."""
        if self.epilogue:
            out = None if self._out is None else self._out.get(x.shape[0])
            return self.run.fused(x, laid_out=self.laid_in and (x.dim() == 2 or self._direct_in),
                                  bias=self.bias, relu=relu, dest=self.dest, out=out,
                                  residual=residual)  # the run lays it out as it reads it
        y = self.run(x.contiguous())
        if self.bias is not None:
            y.add_(self.bias.view(1, -1, 1, 1))
        return y if residual is None else y.add_(residual)

    def _fits(self, residual, n) -> bool:
        """Whether the kernel can add ``residual`` in its epilogue: a float32 CPU tensor of the
        output's NCHW shape (a broadcast or another dtype is added after the kernel)."""
        L = self.layer
        return self.dest is None and residual.dtype == torch.float32 and residual.is_cpu \
            and tuple(residual.shape) == (n, L.cout, L.oh, L.ow)

    @staticmethod
    def _add(y, residual, relu):
        y = y + residual
        return y.relu_() if relu else y

    def prepared_at(self, h: int, w: int) -> str:
        """How this layer runs at an input of ``h`` x ``w`` (prepared now if it is not yet):
        its kernel and configuration, or the dense fallback with the reason."""
        if (h, w) == (self.layer.h, self.layer.w):
            return f"{self.kernel} {json.dumps(self.config, sort_keys=True)}"
        return self._prepared(h, w)[1]

    def _prepared(self, h: int, w: int):
        with _PREPARING:  # threads sharing the model meet one bounded cache
            return self._prepared_locked(h, w)

    def _prepared_locked(self, h: int, w: int):
        key = (h, w)
        if key in self._sizes:
            self._sizes.move_to_end(key)
            return self._sizes[key]
        if self.tuned_at:
            warnings.warn(f"sparsify: {self.tuned_at} runs at another input size: its kernels "
                          f"are prepared for that size on first use with the plan's "
                          f"configurations where they apply, not tuned for it", stacklevel=4)
        lay = dataclasses.replace(self.layer, h=h, w=w)
        k = kernels.get(self.kernel)
        pinned = {p: self.config[p] for p in k.pattern_params if p in self.config}
        why = "no configuration of the kernel supports it"
        for cfg in (self.config, k.default_config(lay, self.sparsity, pinned)):
            if cfg is None or k.supports(lay, self.sparsity, cfg, "float32"):
                continue
            try:
                run = k.prepare(lay, self.masked_weight, self.sparsity, cfg)
            except ValueError as e:
                why = str(e)
                continue
            if torch.equal(run.masked_weight.to(self.masked_weight), self.masked_weight):
                found = (run, f"{k.name} {json.dumps(cfg, sort_keys=True)}")
                break
            why = "its mask at this size differs from the layer's"
        else:
            found = (self._dense, f"dense over masked_weight ({self.kernel}: {why})")
        self._sizes[key] = found
        while len(self._sizes) > SIZES_KEPT:
            self._sizes.popitem(last=False)
        return found

    def _dense(self, x, out=None):
        L = self.layer
        return F.conv2d(x, self.masked_weight, None, L.stride, L.padding, L.dilation, L.groups)

    def _other_size(self, x, residual=None):
        run = self._prepared(int(x.shape[2]), int(x.shape[3]))[0]
        fused = getattr(run, "fused", None)
        if self.epilogue and fused is not None:
            if residual is None:
                return fused(x, bias=self.bias, relu=self.relu)
            return self._add(fused(x, bias=self.bias), residual, self.relu)
        y = run(x.contiguous())
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        if residual is not None:
            return self._add(y, residual, self.epilogue and self.relu)
        return y.relu_() if self.epilogue and self.relu else y

    def extra_repr(self):
        fused = [w for w, on in (("bias" + ("+residual" if self.residual else "")
                                  + ("+relu" if self.relu else ""), self.epilogue),
                                 ("input laid out", self.laid_in),
                                 ("writes the next layer's layout", self.dest is not None)) if on]
        return (f"{self.layer.shape_str}, kernel={self.kernel}, config={self.config}"
                + (f", fused: {', '.join(fused)}" if fused else ""))


class SparseLinear(SparseConv2d):
    """A ``Linear`` computed as the 1x1 convolution it is (``in -> out 1x1 @1x1``, one image per
    row of the input): ``masked_weight`` is ``[out, in, 1, 1]``."""

    def forward(self, x):
        lead = x.shape[:-1]
        y = super().forward(x.reshape(-1, self.layer.cin, 1, 1))
        return y.view(*lead, self.layer.cout)

    def fused_copy(self, **fusion) -> SparseLinear:
        fusion.pop("dest", None), fusion.pop("laid_in", None)  # NCHW is its layout
        return super().fused_copy(**fusion)


class ChannelsLastConv2d(nn.Module):
    """A convolution kept dense, run in channels_last (oneDNN's faster layout on the CPU): its
    output stays channels_last, so the pooling and activations after it run in that layout
    too (PyTorch's NCHW max-pool is several times slower at batch 1); the next sparse layer
    takes its input back to NCHW."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv.to(memory_format=torch.channels_last)

    @property
    def weight(self):
        return self.conv.weight

    def forward(self, x):
        return self.conv(x.contiguous(memory_format=torch.channels_last))


class ChannelsLastPool(nn.Module):
    """A max-pool run in channels_last: PyTorch's NCHW max-pool is several times slower at
    batch 1 than its channels_last one, more than the two layout conversions cost."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        return self.pool(x.contiguous(memory_format=torch.channels_last))


class ConvPool(nn.Module):
    """A convolution kept dense (a stem with few input channels), the ReLU after it (``relu``)
    and the max-pool after that, as one C++ pass (``kernels.stem``) writing channels-last: the
    convolution's full-size output never leaves the cache, where the three operations write and
    read it three times (ResNet50's stem at batch 1 on a 2-core EPYC, warm: 1.16 ms against 1.51
    ms). ``fuse_layers`` puts one in where ``sparsify`` measured the pass faster than the three
    operations (``Report.conv_pool_kept``), or everywhere with ``dense_layout="conv_pool"``; any
    input the pass does not take (another dtype, a gradient wanted) runs the three operations."""

    def __init__(self, conv: ChannelsLastConv2d, relu: bool, pool: ChannelsLastPool):
        super().__init__()
        self.conv, self.relu, self.pool = conv, relu, pool
        c = conv.conv
        self._packed = self._packed_of = None  # the weight as the pass reads it, and of what
        self._args = (square(c.kernel_size), square(c.stride), square(c.padding),
                      max_pool_args(pool.pool))

    @property
    def weight(self):
        return self.conv.weight

    def packed(self) -> torch.Tensor:
        """The convolution's weight packed for the pass: packed again whenever the weight
        changed (another tensor, or this one written in place: a state dict loaded)."""
        from kernels import stem

        w = self.conv.conv.weight
        of = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._packed_of != of:
            self._packed, self._packed_of = stem.pack_weight(w), of
        return self._packed

    def forward(self, x):
        c = self.conv.conv
        if x.dim() == 4 and x.shape[1] == c.in_channels and x.dtype == c.weight.dtype \
                == torch.float32 and x.is_cpu and c.weight.is_cpu \
                and (c.bias is None or c.bias.dtype == torch.float32) \
                and not torch.is_grad_enabled():
            from kernels import stem

            k, s, pad, pool = self._args
            return stem.conv_pool(x, self.packed(), c.bias, k, s, pad, pool, self.relu)
        return self.apart(x)

    def apart(self, x):
        """The three operations one after another (channels_last), as the network runs them
        without the pass."""
        y = self.conv(x)
        return self.pool(F.relu(y) if self.relu else y)


class NchwMaxPool(nn.Module):
    """A max-pool in NCHW: one parallel C++ pass (``kernels.cpu_layout.max_pool_nchw``) where it
    applies (a contiguous float32 CPU input, square window, no dilation or ceil_mode), PyTorch's
    own otherwise. PyTorch's NCHW max-pool is several times slower at batch 1 (VGG19's first
    pool: 12.4 ms against 2.4 ms, 2-core EPYC)."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool
        self._args = max_pool_args(pool)

    def forward(self, x):
        if self._args is not None and x.dim() == 4 and x.dtype == torch.float32 and x.is_cpu \
                and x.is_contiguous():
            from kernels.cpu_layout import max_pool_nchw

            return max_pool_nchw(x, *self._args)
        return self.pool(x)


class GemvLinear(nn.Module):
    """A dense ``nn.Linear`` (a classifier left dense) that reads its weight in one parallel C++
    pass for a few images (``kernels.cpu_layout.linear_gemv``, up to ``GEMV_MAX_ROWS``); any
    other input goes to the Linear itself. ``sparsify`` puts one in only where it was measured
    faster at the images per call the network runs (``Report.dense_linear``): PyTorch's batch-1
    Linear read VGG19's 411 MB first classifier layer in 24.8 ms, this pass in 14.5 ms (2-core
    EPYC, AVX-512)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        w, b = self.lin.weight, self.lin.bias
        if x.dim() == 2 and 1 <= x.shape[0] <= GEMV_MAX_ROWS \
                and x.dtype == w.dtype == torch.float32 \
                and x.is_cpu and w.is_cpu and x.is_contiguous() and w.is_contiguous() \
                and not torch.is_grad_enabled():
            from kernels.cpu_layout import linear_gemv

            return linear_gemv(x, w.detach(), None if b is None else b.detach())
        return self.lin(x)


@dataclass
class Report:
    """What ``sparsify`` did: replaced layers (name -> kernel, config) and layers kept dense
    (name -> reason), the BatchNorms folded, and whether the classifier was sparsified."""

    pattern: str
    sparsity: float
    replaced: dict = field(default_factory=dict)
    dense: dict = field(default_factory=dict)
    folded: list = field(default_factory=list)
    plan: str | None = None
    classifier: str = "kept dense (only convolutions are sparsified)"
    relu_fused: list = field(default_factory=list)  # layers whose ReLU runs in the kernel
    # layers ending a residual block whose shortcut addition (and the ReLU after it, listed in
    # relu_fused) runs in the kernel's epilogue
    residual_fused: list = field(default_factory=list)
    handover: list = field(default_factory=list)  # (producer, consumer) in the kernel's layout
    # dense convolutions run with their ReLU and max-pool as one pass (ConvPool) in this network
    conv_pool: list = field(default_factory=list)
    fusion: str = "not fused"  # what fuse() did, or why it could not
    # the layout the dense convolutions and max-pools run in (CPU), and the measurement behind
    # the choice (``sparsify(dense_layout="measure")``)
    dense_layout: str = "as built"
    # pairs whose consumer has stride 2 (the producer scatters each row over the consumer's
    # phase planes): "producer -> consumer" -> what measuring both ways found; only those in
    # ``strided_kept`` hand over (``sparsify`` measures them; unmeasured, none does)
    strided: dict = field(default_factory=dict)
    strided_kept: list = field(default_factory=list)
    # layers ending a residual block: layer -> what timing the kernel with the shortcut addition
    # (and ReLU) in its epilogue against the kernel followed by them found; those in
    # ``residual_apart`` were slower fused and add the shortcut after the kernel (``sparsify``
    # measures them; unmeasured, every one is fused)
    residual: dict = field(default_factory=dict)
    residual_apart: list = field(default_factory=list)
    # dense convolutions whose output goes through a ReLU to a max-pool (channels_last): name ->
    # what timing the three as one pass (ConvPool) against one after another found; those in
    # ``conv_pool_kept`` were faster as one pass and ``fuse_layers`` fuses them
    conv_pool_timed: dict = field(default_factory=dict)
    conv_pool_kept: list = field(default_factory=list)
    # dense Linear layers (a classifier left dense): name -> which runs it at the images per
    # call, PyTorch's Linear or the C++ pass (GemvLinear), and the times measured for both (CPU)
    dense_linear: dict = field(default_factory=dict)
    # images per call of the fused network on a larger batch (0: the whole batch at once), and
    # the measurement behind it (``sparsify`` times each chunk size at its ``batch``)
    batch_chunk: int = 0
    batch_chunks: str = "whole batch (not measured)"

    def decisions(self) -> dict:
        """What ``sparsify`` chose by measuring (the dense layout, the dense Linears run by the
        C++ pass, the images per call, the stride-2 pairs that hand over, the block ends that
        add their shortcut after the kernel), as JSON: ``sparsify(..., decisions=)`` builds the same network again
        without measuring (a process timing it alone runs the network the run measured)."""
        layout = self.dense_layout.split()[0] if self.dense_layout else None
        return {"dense_layout": layout if layout in DENSE_LAYOUTS[1:] else None,
                "gemv": sorted(n for n, v in self.dense_linear.items()
                               if v.startswith("C++ pass")),
                "batch_chunk": self.batch_chunk,
                "strided": [list(p) for p in self.strided_kept],
                "residual_apart": list(self.residual_apart),
                "conv_pool": list(self.conv_pool_kept)}

    def dense_ops(self) -> str:
        """Where the dense operations run: their layout, each convolution, ReLU and max-pool
        chain timed as one pass, then each dense Linear's engine."""
        return self.dense_layout + "".join(
            f"; {k}: {v}" for k, v in (*self.conv_pool_timed.items(), *self.dense_linear.items()))

    def summary(self) -> str:
        return (f"{len(self.replaced)} convolution(s) sparse, {len(self.dense)} dense, "
                f"{len(self.folded)} BatchNorm(s) folded; {self.plan or 'default configurations'}"
                f"; {self.fusion}; dense operations: {self.dense_ops()}; batch: "
                f"{self.batch_chunks}")


def _trace(model: nn.Module, input_size) -> tuple[dict, dict]:
    """(conv name -> ConvLayer at its real input size, conv name -> name of the BatchNorm that
    directly consumes its output), from one forward pass on zeros."""
    try:  # the layers' geometry, with from_model's checks (square stride, no string padding)
        layers = {lay.name: lay for lay in shapes.from_model(model, input_size)}
    except ValueError as e:
        raise SparsifyError(str(e)) from None
    names = {m: n for n, m in model.named_modules()}
    outputs, follows = {}, {}

    def conv_hook(mod, inputs, out):
        outputs[id(out)] = (names[mod], out)  # keep the tensor alive: ids stay unique

    def bn_hook(mod, inputs):
        hit = outputs.get(id(inputs[0]))
        if hit is not None and hit[1] is inputs[0]:
            follows[hit[0]] = names[mod]

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules()
             if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(bn_hook) for m in model.modules()
              if isinstance(m, nn.BatchNorm2d)]
    _run_hooked(model, hooks, input_size)
    return layers, follows


def _run_hooked(model: nn.Module, hooks, input_size) -> None:
    """One forward pass on zeros with ``hooks`` registered, removed afterwards."""
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_size)))
    finally:
        for h in hooks:
            h.remove()


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter((conv.weight * scale.view(-1, 1, 1, 1)).detach())
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias = nn.Parameter(((b - bn.running_mean) * scale + bn.bias).detach())
    return fused


def dense_folded(model: nn.Module, input_size=(3, 224, 224)):
    """(copy of ``model`` in eval mode with every conv-then-BatchNorm pair folded, the traced
    layers, the folded pairs)."""
    m = copy.deepcopy(model).eval()
    layers, follows = _trace(m, input_size)
    for conv_name, bn_name in follows.items():
        _set(m, conv_name, _fold(m.get_submodule(conv_name), m.get_submodule(bn_name)))
        _set(m, bn_name, nn.Identity())
    return m, layers, sorted(follows.values())


def default_kernel(layer, pattern: str, sparsity: float, device: Device, dtype="float32"):
    """(kernel, config, None) the harness picks for a layer without a plan, or
    (None, None, reason): the first kernel of the pattern on the device that supports the layer
    with its default configuration, in the order of the kernels' ``default_rank`` (measured
    faster first), then by name."""
    reasons = []
    names = kernels.names(device=device.kernel_device, pattern=pattern)
    for name in sorted(names, key=lambda n: (kernels.get(n).default_rank, n)):
        k = kernels.get(name)
        cfg = k.default_config(layer, sparsity)
        why = k.supports(layer, sparsity, cfg, dtype) if cfg is not None else "no configuration"
        if why is None:
            return k, cfg, None
        reasons.append(f"{name}: {why}")
    return None, None, "; ".join(reasons) or f"no {device.kernel_device} kernel implements " \
                                             f"pattern {pattern}"


class _Tracer(fx.Tracer):
    """Traces through containers and blocks; the harness's layer modules are leaves."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, (SparseConv2d, ChannelsLastConv2d, ChannelsLastPool, NchwMaxPool,
                              GemvLinear, ConvPool)) \
            or super().is_leaf_module(m, qualname)


def _is_relu(node, mods) -> bool:
    if node.op == "call_module":
        return isinstance(mods.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_) and not node.kwargs
    return node.op == "call_method" and node.target in ("relu", "relu_") and not node.kwargs


def _is_add(node) -> bool:
    """A plain two-tensor addition (``a + b``, ``torch.add(a, b)``, ``a.add(b)``)."""
    if node.kwargs or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    if node.op == "call_function":
        return node.target in (operator.add, operator.iadd, torch.add)
    return node.op == "call_method" and node.target in ("add", "add_")


class BatchChunks(fx.GraphModule):
    """A fused network (``fuse_layers``) that runs a batch of more than ``batch_chunk`` images
    ``batch_chunk`` at a time and concatenates the outputs (0: the whole batch at once). Each
    image's result is the same either way; what changes is how much of the activations the
    caches hold: on a 2-core EPYC, ResNet50 at 93.75% and batch 8 ran 1.18-1.52x faster two
    images at a time than all eight at once with 1xN (six measurements), 0.96-1.46x with CS
    (five), so ``sparsify`` measures the choice. Only a call of the module runs in chunks:
    ``forward``, a trace, ``copy.copy`` and pickling give the plain graph, the whole batch at
    once (``copy.deepcopy`` keeps the chunks)."""

    batch_chunk = 0

    def parts(self, x) -> tuple:
        """The pieces of input ``x`` that one call runs one after another."""
        c = self.batch_chunk
        if c and isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] > c:
            return x.split(c)
        return (x,)

    def __call__(self, x, *args, **kwargs):
        parts, call = self.parts(x), super().__call__
        if len(parts) == 1:
            return call(x, *args, **kwargs)
        return torch.cat([call(part, *args, **kwargs) for part in parts])

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        res.batch_chunk = self.batch_chunk
        return res


def fuse_layers(model: nn.Module, handover: bool | str = True,
                residual: bool | str = True, batch_chunk: int | None = None,
                conv_pool: bool | None = None) -> nn.Module:
    """The sparse model with its C++ CPU layers fused (a ``torch.fx`` GraphModule sharing the
    prepared kernels; ``model`` itself is left as it is). Where a sparse convolution's only use
    is a ReLU, the ReLU moves into the kernel's epilogue (with the bias); with ``residual``,
    where its only use is an addition of another tensor (a residual block's shortcut), that
    addition, and the ReLU when it is the addition's only use, move there too (the shortcut
    becomes the layer's second input, read in the layout the kernel writes: NCHW, or
    channels-last for a channels-last kernel; one of another shape or dtype is added after the
    kernel), except for the layers the report's ``residual_apart`` lists (measured
    slower fused by ``sparsify``), or for every one with ``residual="all"``; with ``handover``,
    where its only use is the next sparse convolution, it writes that one's layout directly,
    so the next layer converts nothing: one padded plane (stride 1) always, the stride-phase
    planes of a stride-2 consumer for the pairs the report's ``strided_kept`` lists (measured
    faster by ``sparsify``), or for every pair with ``handover="strided"``. What was
    fused is in the copy's ``sparsify_report`` (``relu_fused``, ``residual_fused``,
    ``handover``, ``fusion``); a
    model torch.fx cannot trace, or with nothing to fuse, is returned as it is, with the reason
    in its report's ``fusion``. With ``conv_pool`` (None: those the report's
    ``conv_pool_kept`` lists, as ``sparsify`` measured them, or every one where its
    ``dense_layout`` is "conv_pool"), a convolution kept dense whose output goes only to a
    max-pool, or only to a ReLU whose output goes only to a max-pool, runs with them as one
    pass (:class:`ConvPool`; the report's ``conv_pool`` lists them). The result is a
    :class:`BatchChunks` running ``batch_chunk`` images per call (None: the report's
    ``batch_chunk``, as ``sparsify`` measured it)."""
    report = copy.copy(getattr(model, "sparsify_report", None) or Report("?", 0.0))
    report.relu_fused, report.handover, report.residual_fused = [], [], []
    report.conv_pool = []
    if conv_pool is None:
        conv_pool = True if report.dense_layout.split()[:1] == ["conv_pool"] \
            else set(report.conv_pool_kept)

    def unfused(why: str) -> nn.Module:  # the model as it is, its own report saying why
        own = getattr(model, "sparsify_report", None) or report
        own.relu_fused, own.handover, own.residual_fused, own.fusion = [], [], [], why
        own.conv_pool = []
        model.sparsify_report = own
        return model

    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - data-dependent control flow and the like
        return unfused(f"not fused: torch.fx cannot trace the model "
                       f"({str(e).strip().splitlines()[0][:120]})")
    gm = BatchChunks(model, graph)
    mods = dict(gm.named_modules())
    for node in list(graph.nodes):  # the folded BatchNorms
        if node.op == "call_module" and isinstance(mods.get(node.target), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")

    def fusable(node):
        m = mods.get(node.target) if node.op == "call_module" else None
        ok = isinstance(m, SparseConv2d) and m.run.fused is not None and calls[node.target] == 1
        return m if ok else None

    spec: dict = {}
    for node in list(graph.nodes):
        m = fusable(node)
        if m is None:
            continue
        mine = spec.setdefault(node.target, {})
        users = list(node.users)
        if len(users) == 1 and _is_relu(users[0], mods) and users[0].args[0] is node:
            users[0].replace_all_uses_with(node)
            graph.erase_node(users[0])
            mine["relu"] = True
            report.relu_fused.append(node.target)
        users = list(node.users)
        nxt = fusable(users[0]) if len(users) == 1 else None
        lay = nxt.in_layout if nxt is not None else None
        if handover and lay is not None and m.in_layout is not None \
                and users[0].args == (node,) and not users[0].kwargs:
            strided_ok = nxt.layer.stride == 1 or handover == "strided" or \
                (node.target, users[0].target) in report.strided_kept
            if not lay.direct and strided_ok and (nxt.layer.cin, nxt.layer.h, nxt.layer.w) == \
                    (m.layer.cout, m.layer.oh, m.layer.ow):
                mine["dest"] = lay
                spec.setdefault(users[0].target, {})["laid_in"] = True
                report.handover.append((node.target, users[0].target))
    def block_end(add):  # the addition's first operand that can take the other in its epilogue
        a, b = add.args
        # an in-place addition writes its first operand: only the layer's own output may be it
        pairs = ((a, b),) if add.target in (operator.iadd, "add_") else ((a, b), (b, a))
        for node, other in pairs:
            m = fusable(node)
            if m is not None and not isinstance(m, SparseLinear) and len(node.users) == 1 \
                    and len(node.args) == 1 and not node.kwargs and other is not node \
                    and not (m.relu or spec.get(node.target, {}).get("relu")):  # relu(conv)+x
                return node, other
        return None, None

    for add in list(graph.nodes) if residual else ():
        node, other = block_end(add) if _is_add(add) else (None, None)
        if node is None or (residual != "all" and node.target in report.residual_apart):
            continue  # a layer measured slower fused leaves the addition to its shortcut too
        after = list(add.users)
        relu = after[0] if len(after) == 1 and _is_relu(after[0], mods) \
            and after[0].args[0] is add else None
        with graph.inserting_before(add):  # the shortcut is computed by then
            fused = graph.call_module(node.target, (node.args[0], other))
        (relu or add).replace_all_uses_with(fused)
        for gone in (relu, add, node):
            if gone is not None:
                graph.erase_node(gone)
        mine = spec.setdefault(node.target, {})
        mine["residual"] = True
        report.residual_fused.append(node.target)
        if relu is not None:
            mine["relu"] = True
            report.relu_fused.append(node.target)
    for node in list(graph.nodes) if conv_pool else ():
        chain = _conv_pool_chain(node, mods, calls)
        if chain is not None and (conv_pool is True or node.target in conv_pool):
            relu, pool = chain
            _set(gm, node.target, ConvPool(mods[node.target], relu is not None,
                                           mods[pool.target]))
            pool.replace_all_uses_with(node)
            for gone in (pool, relu):
                if gone is not None:
                    graph.erase_node(gone)
            report.conv_pool.append(node.target)
    if not spec:
        return unfused("not fused: no layer runs a C++ CPU kernel")
    for target, fusion in spec.items():
        _set(gm, target, mods[target].fused_copy(**fusion))
    graph.lint()
    gm.recompile()
    report.fusion = (f"{len(spec)} sparse layer(s) fused: bias in the kernel, "
                     f"{len(report.relu_fused)} ReLU(s) in the kernel, "
                     + (f"{len(report.residual_fused)} residual addition(s) in the kernel, "
                        if residual else "no residual addition fused, ")
                     + (f"{len(report.handover)} layer pair(s) hand over in the kernel's layout"
                        if handover else "no layout handover")
                     + (f", {len(report.conv_pool)} dense convolution(s) with their max-pool "
                        f"in one pass" if report.conv_pool else ""))
    gm.sparsify_report = report
    gm.batch_chunk = report.batch_chunk if batch_chunk is None else batch_chunk
    return gm


def _conv_pool_chain(node, mods: dict, calls: Counter) -> tuple | None:
    """(the ReLU node or None, the max-pool node) where ``node`` runs a dense convolution
    (:class:`ChannelsLastConv2d`, called once) whose output goes only to that max-pool
    (:class:`ChannelsLastPool`), directly or through that ReLU, and ``kernels.stem`` runs the
    pair here; else None."""
    from kernels import stem

    conv = mods.get(node.target) if node.op == "call_module" else None
    if not isinstance(conv, ChannelsLastConv2d) or calls[node.target] != 1 \
            or len(node.args) != 1 or node.kwargs or len(node.users) != 1:
        return None
    relu = nxt = next(iter(node.users))
    if _is_relu(relu, mods) and relu.args == (node,) and len(relu.users) == 1:
        nxt = next(iter(relu.users))
    else:
        relu = None
    pool = mods.get(nxt.target) if nxt.op == "call_module" else None
    if not isinstance(pool, ChannelsLastPool) or calls[nxt.target] != 1 \
            or nxt.args != (relu or node,) or nxt.kwargs \
            or stem.why_not(conv.conv, pool.pool) is not None or not stem.available():
        return None
    return relu, nxt


def _linears(model: nn.Module, input_size) -> dict:
    """Linear name -> the 1x1 ConvLayer it is, for every ``nn.Linear`` the forward pass runs."""
    seen = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(mod, inputs, out):
        seen.setdefault(names[mod], shapes.ConvLayer(
            net="model", name=names[mod], index=len(seen), cin=mod.in_features,
            cout=mod.out_features, kh=1, kw=1, stride=1, padding=0, h=1, w=1))

    _run_hooked(model, [m.register_forward_hook(hook) for m in model.modules()
                        if isinstance(m, nn.Linear)], input_size)
    return seen


def sparsify(model: nn.Module, pattern: str, sparsity: float, plan: Plan | dict | None = None,
             device: str = "cpu", input_size=(3, 224, 224), net: str | None = None,
             batch: int = 1, identity: str | None = None, fuse: bool = True,
             linear: bool = False, dense_layout: str = "measure", decisions: dict | None = None):
    """A copy of ``model`` whose convolutions run sparse kernels; see the module docstring.
    What was replaced, kept dense (with the reason) and folded is in its ``sparsify_report``
    (:class:`Report`). ``plan`` (a ``harness.plan.Plan``, or its JSON object) is checked
    first: one made for another net, pattern, sparsity, batch, device, machine (``identity``)
    or kernel source is refused with a one-line :class:`SparsifyError`. With ``fuse`` the result
    goes through :func:`fuse_layers` (epilogues and layout handover on the CPU). With ``linear``
    every ``nn.Linear`` (the classifier) is sparsified too, as the 1x1 convolution it is
    (:class:`SparseLinear`); the report's ``classifier`` says what happened.

    On the CPU the operations that stay dense (convolutions kept dense, such as a stem with
    three input channels, and max-pools) run in one layout for the whole network:
    ``dense_layout="channels_last"`` or ``"nchw"``; ``"conv_pool"`` is channels_last with
    every convolution kept dense, its ReLU and the max-pool after it run as one C++ pass
    (:class:`ConvPool`, a ResNet's stem); by default ``"measure"``: the network is timed both
    ways at ``input_size`` and ``batch`` (interleaved, a second or two; channels_last with
    those chains as one pass) and the faster is kept (the report's ``dense_layout`` gives both
    times), then, in channels_last, each chain is timed as one pass against its three
    operations on its real input and runs as one pass where that was faster (the report's
    ``conv_pool_timed`` and ``conv_pool_kept``).

    ``input_size`` (C, H, W) is the size the kernels are prepared for first (and the size a
    plan's layer shapes are matched at); the model takes any other height, width and batch as
    the dense one does: each sparse layer prepares its kernel for a new size on first use
    (:class:`SparseConv2d`), with the same masks.

    At a ``batch`` above 1 the fused network is timed whole and at 1, 2, 4 and 8 images per
    call (those dividing ``batch``, each checked first to give the whole batch's answer), and
    the fastest is kept (:class:`BatchChunks`; the report's ``batch_chunk`` and
    ``batch_chunks``); the dense layout, stride-2 handover and residual choices are then timed
    at that many images. The choice is the fused network's (``fuse_layers`` applies it): with
    ``fuse=False`` the model returned takes the whole batch in one call.

    ``decisions`` (``Report.decisions()`` of an earlier call on the same model and arguments)
    replays what that call chose by measuring, measuring nothing."""
    from kernels import patterns as P

    dev = Device(device)
    if dense_layout not in DENSE_LAYOUTS:
        raise SparsifyError(f"dense_layout must be one of {', '.join(DENSE_LAYOUTS)}, not "
                            f"{dense_layout!r}")
    if pattern not in P.names():
        raise SparsifyError(f"unknown pattern {pattern!r}; valid: {', '.join(P.names())}")
    if plan is not None:
        try:
            plan = Plan.of(plan, check_kernels=False)
            plan.check(net, pattern, sparsity, batch, identity, dev)
        except PlanError as e:
            raise SparsifyError(str(e)) from None
    by_shape = plan.by_shape if plan is not None else {}
    tuned_at = None if plan is None else (f"the plan for {plan.net} {plan.pattern} "
                                          f"S={plan.sparsity:g} at a {input_size[-2]}x"
                                          f"{input_size[-1]} input")
    m, layers, folded = dense_folded(model, input_size)
    m = m.to(dev.tensor_device)
    report = Report(pattern=pattern, sparsity=sparsity, folded=folded,
                    plan=None if plan is None else f"plan {plan.net} {plan.pattern} "
                                                   f"S={plan.sparsity}")
    for name, layer in layers.items():
        conv = m.get_submodule(name)
        entry = by_shape.get(layer.shape_str)
        if entry is not None:
            k, cfg = kernels.get(entry.kernel), dict(entry.config)
            why = None if k.pattern != "dense" else "the plan keeps it dense (fastest)"
        else:
            k, cfg, why = default_kernel(layer, pattern, sparsity, dev)
            if plan is not None and why is None:
                why = "not in the plan"
        if why:
            report.dense[name] = why
            if dev is Device.CPU:
                _set(m, name, ChannelsLastConv2d(conv))
            continue
        run = k.prepare(layer, conv.weight.detach().to(dev.tensor_device), sparsity, cfg)
        bias = None if conv.bias is None else conv.bias.detach().to(dev.tensor_device)
        _set(m, name, SparseConv2d(layer, run, bias, k.name, cfg, sparsity=sparsity,
                                   tuned_at=tuned_at if entry is not None else None))
        report.replaced[name] = {"kernel": k.name, "config": json.dumps(cfg, sort_keys=True)}
    if linear:
        _sparsify_linears(m, input_size, pattern, sparsity, by_shape, dev, report)
    if dev is Device.CPU and report.replaced:
        for name, mod in list(m.named_modules()):
            if isinstance(mod, nn.MaxPool2d):
                _set(m, name, ChannelsLastPool(mod))
    m.sparsify_report = report
    if dev is Device.CPU and report.replaced:
        d = decisions or {}
        # the images per call first: the choices after it are timed at that many images
        chunk = _choose_batch_chunk(m, (batch, *input_size), d.get("batch_chunk"))
        how = d.get("dense_layout") or dense_layout
        m = _choose_dense_layout(m, how, (chunk, *input_size))
        if how == "measure" or d.get("conv_pool") is not None:
            _choose_conv_pool(m, (chunk, *input_size), d.get("conv_pool"))
        _choose_dense_linear(m, chunk, d.get("gemv"))
        _choose_strided_handover(m, (chunk, *input_size), d.get("strided"))
        _choose_residual(m, (chunk, *input_size), d.get("residual_apart"))
    return fuse_layers(m) if fuse and report.replaced else m


def inputs_of(model: nn.Module, names, x, every=False) -> dict:
    """Module name -> the input it receives when ``model`` runs on ``x`` (with ``every``, the
    tuple of all its inputs, such as a fused block end's input and shortcut)."""
    seen, want = {}, set(names)

    def keep(inputs):
        kept = tuple(t.detach().clone() for t in inputs)
        return kept if every else kept[0]

    hooks = [mod.register_forward_pre_hook(
        lambda mod, inputs, n=n: seen.setdefault(n, keep(inputs)))
        for n, mod in model.named_modules() if n in want]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _choose_strided_handover(m: nn.Module, size, kept: list | None = None) -> None:
    """Which producer -> stride-2 consumer pairs hand over (``Report.strided_kept``): each
    pair timed both ways on the producer's real input, interleaved: the producer scattering
    its rows over the consumer's phase planes, against NCHW out and the consumer converting.
    Scattering is measured slower for some kernels and layers and faster for others. ``kept``:
    the pairs an earlier measurement kept (nothing is timed)."""
    from .timing import interleaved_cpu

    report = m.sparsify_report
    report.strided, report.strided_kept = {}, []
    every = fuse_layers(m, handover="strided")
    pairs = [(a, b) for a, b in every.sparsify_report.handover
             if every.get_submodule(b).layer.stride > 1]
    if not pairs:
        return
    if kept is not None:
        want = {tuple(p) for p in kept}
        for a, b in pairs:
            report.strided[f"{a} -> {b}"] = (f"{'hands over' if (a, b) in want else 'converts'}"
                                            f": as decided before (not measured here)")
        report.strided_kept = [p for p in pairs if p in want]
        return
    base = fuse_layers(m)  # the stride-1 pairs hand over, as deployed; these pairs convert
    ins = inputs_of(m, [a for a, _ in pairs], torch.randn(*size))  # unfused: NCHW inputs

    def arg(mod, xa):  # the producer's input as it arrives there: its own layout if handed
        return mod.in_layout.layout(xa) if mod.laid_in else xa

    for a, b in pairs:
        pa, pb, fa, fb = (g.get_submodule(n) for g in (base, every) for n in (a, b))
        with torch.inference_mode():
            st = interleaved_cpu({"convert": (lambda t, p=pa, q=pb: q(p(t)), arg(pa, ins[a])),
                                  "scatter": (lambda t, p=fa, q=fb: q(p(t)), arg(fa, ins[a]))},
                                 rounds=7, min_sample=0.01, warmup=0.02).stats
        conv, scat = st["convert"].median, st["scatter"].median
        kept = scat < conv
        report.strided[f"{a} -> {b}"] = (
            f"{'hands over' if kept else 'converts'}: producer writing the phase planes "
            f"{scat * 1e6:.0f} us against NCHW and converting {conv * 1e6:.0f} us (the pair)")
        if kept:
            report.strided_kept.append((a, b))


def residual_variants(fused: nn.Module, x) -> dict:
    """Layer -> {"apart": (fn, input), "fused": (fn, input)} for every layer of ``fused`` (a
    :func:`fuse_layers` result) that adds its block's shortcut in its epilogue: the kernel
    followed by the addition and ReLU (as the unfused network runs them), and the
    fused layer, each on the layer's real input and shortcut when ``fused`` runs on ``x``. The
    addition is out of place, as in the traced network (``out += identity`` traces to
    ``operator.add``), so the separate side allocates its output as deployed."""
    names = fused.sparsify_report.residual_fused
    ins = inputs_of(fused, names, x, every=True)
    out = {}
    for name in names:
        m = fused.get_submodule(name)
        xin, res = ins[name]

        def apart(t, m=m, r=res):
            y = m._conv(t, False) + r
            return y.relu_() if m.relu else y

        out[name] = {"apart": (apart, xin), "fused": (lambda t, m=m, r=res: m(t, r), xin)}
    return out


def conv_pool_variants(fused: nn.Module, x) -> dict:
    """Layer -> {"one": (fn, input), "apart": (fn, input)} for every convolution of ``fused``
    (a :func:`fuse_layers` result) run with its ReLU and max-pool as one pass
    (:class:`ConvPool`): the pass, and the three operations one after another, each on the
    layer's real input when ``fused`` runs on ``x``."""
    names = fused.sparsify_report.conv_pool
    ins = inputs_of(fused, names, x)
    return {name: {"one": (fused.get_submodule(name), ins[name]),
                   "apart": (fused.get_submodule(name).apart, ins[name])} for name in names}


def _choose_residual(m: nn.Module, size, apart: list | None = None) -> None:
    """Which layers ending a residual block add the shortcut in their epilogue (all but
    ``Report.residual_apart``): each timed both ways on its real input and shortcut,
    interleaved. Fused, the kernel reads the shortcut while it writes; in a layer whose
    threads write narrow strips of many channels (1xN at 56x56) that was measured slower than
    the separate addition. ``apart``: the layers an earlier measurement left apart (nothing is
    timed)."""
    from .timing import interleaved_cpu

    report = m.sparsify_report
    report.residual, report.residual_apart = {}, []
    every = fuse_layers(m, residual="all")
    if apart is not None:
        for name in every.sparsify_report.residual_fused:
            report.residual[name] = (f"{'apart' if name in apart else 'fused'}: as decided "
                                     f"before (not measured here)")
        report.residual_apart = [n for n in every.sparsify_report.residual_fused if n in apart]
        return
    for name, variants in residual_variants(every, torch.randn(*size)).items():
        with torch.inference_mode():
            st = interleaved_cpu(variants, rounds=5, min_sample=0.002, warmup=0.0).stats
        apart, fused = st["apart"].median, st["fused"].median
        report.residual[name] = (
            f"{'fused' if fused < apart else 'apart'}: shortcut added in the kernel "
            f"{fused * 1e6:.0f} us against after it {apart * 1e6:.0f} us")
        if fused >= apart:
            report.residual_apart.append(name)


DENSE_LAYOUTS = ("measure", "channels_last", "nchw", "conv_pool")


def _in_nchw(m: nn.Module) -> nn.Module:
    """The same network with its dense convolutions and max-pools in NCHW (the pools through
    :class:`NchwMaxPool`; the sparse layers, prepared kernels and all, and the report are
    shared, not copied)."""
    memo = {id(mod): mod for mod in m.modules() if isinstance(mod, SparseConv2d)}
    memo[id(m.sparsify_report)] = m.sparsify_report
    out = copy.deepcopy(m, memo)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, ChannelsLastConv2d):
            _set(out, name, mod.conv.to(memory_format=torch.contiguous_format))
        elif isinstance(mod, ChannelsLastPool):
            _set(out, name, NchwMaxPool(mod.pool))
    return out


def _choose_dense_layout(m: nn.Module, how: str, size) -> nn.Module:
    """``m`` (dense operations in channels_last, as built) or its NCHW twin: as asked, or the
    faster as fused and deployed, timed interleaved on a random input of ``size`` (channels_last
    with each dense convolution, ReLU and max-pool chain as one pass: ``_choose_conv_pool`` then
    times each chain on its own)."""
    report = m.sparsify_report
    dense = [mod for mod in m.modules() if isinstance(mod, (ChannelsLastConv2d,
                                                           ChannelsLastPool))]
    if not dense:
        report.dense_layout = "none: no convolution or max-pool stays dense"
        return m
    if how != "measure":
        report.dense_layout = f"{how} (as asked)"
        return _in_nchw(m) if how == "nchw" else m
    from .timing import interleaved_cpu

    nchw = _in_nchw(m)
    x = torch.randn(*size)
    variants = {"channels_last": fuse_layers(m, conv_pool=True),
                "nchw": fuse_layers(nchw, conv_pool=False)}
    chains = len(variants["channels_last"].sparsify_report.conv_pool)
    with torch.inference_mode():
        st = interleaved_cpu({k: (v, x) for k, v in variants.items()}, rounds=5,
                             min_sample=0.02, warmup=0.05).stats
    best = min(st, key=lambda k: st[k].median)
    report.dense_layout = (
        f"{best} ({len(dense)} dense operation(s); measured whole network at "
        f"{'x'.join(map(str, size))}: channels_last {st['channels_last'].median * 1e3:.2f} ms"
        + (f" (with {chains} convolution, ReLU and max-pool chain(s) in one pass)"
           if chains else "") + f", NCHW {st['nchw'].median * 1e3:.2f} ms)")
    return nchw if best == "nchw" else m


def _choose_conv_pool(m: nn.Module, size, kept: list | None = None) -> None:
    """Which dense convolution, (ReLU,) max-pool chains run as one pass (``ConvPool``;
    ``Report.conv_pool_kept``): each timed as one pass against its three operations on its real
    input, interleaved (a few hundred microseconds on a ResNet stem: within a whole network's
    noise, not a layer's). ``kept``: the chains an earlier measurement kept (nothing is
    timed)."""
    from .timing import interleaved_cpu

    report = m.sparsify_report
    report.conv_pool_timed, report.conv_pool_kept = {}, []
    every = fuse_layers(m, conv_pool=True)
    names = every.sparsify_report.conv_pool
    if kept is not None:
        for name in names:
            report.conv_pool_timed[name] = (f"{'one pass' if name in kept else 'apart'}: as "
                                            f"decided before (not measured here)")
        report.conv_pool_kept = [n for n in names if n in kept]
        return
    for name, variants in conv_pool_variants(every, torch.randn(*size)).items():
        with torch.inference_mode():
            st = interleaved_cpu(variants, rounds=5, min_sample=0.01, warmup=0.0).stats
        one, apart = st["one"].median, st["apart"].median
        report.conv_pool_timed[name] = (
            f"{'one pass' if one < apart else 'apart'}: convolution, ReLU and max-pool in one "
            f"pass {one * 1e3:.2f} ms against one after another {apart * 1e3:.2f} ms")
        if one < apart:
            report.conv_pool_kept.append(name)


BATCH_CHUNKS = (1, 2, 4, 8)  # images per call tried on a larger batch (the whole batch too)


def _choose_batch_chunk(m: nn.Module, size, decided: int | None = None) -> int:
    """How many images each call of the fused network runs (``Report.batch_chunk``; 0: the
    whole batch at once), returning the batch one call then runs: at a batch above 1 the fused
    network is timed whole and in chunks of each size of ``BATCH_CHUNKS`` dividing the batch,
    interleaved on a random input of ``size``, and the fastest is kept (``batch_chunks`` gives
    every time). ``decided``: an earlier measurement's choice (nothing is timed)."""
    from .timing import interleaved_cpu

    report, batch = m.sparsify_report, size[0]
    report.batch_chunk = 0
    if batch <= 1:
        report.batch_chunks = "whole batch (batch 1)"
        return batch
    if decided is not None:
        report.batch_chunk = int(decided)
        report.batch_chunks = (f"{_chunk_words(report.batch_chunk)} (as decided before, not "
                               f"measured here)")
        return report.batch_chunk or batch
    sizes = [c for c in BATCH_CHUNKS if c < batch and batch % c == 0] + [0]
    nets = {c: fuse_layers(m, batch_chunk=c) for c in sizes}
    if not isinstance(nets[0], BatchChunks):
        report.batch_chunks = f"whole batch ({nets[0].sparsify_report.fusion})"
        return batch
    x = torch.randn(*size)
    why = _chunks_differ(nets, x)
    if why:
        report.batch_chunks = f"whole batch ({why})"
        return batch
    with torch.inference_mode():
        st = interleaved_cpu({c: (net, x) for c, net in nets.items()}, rounds=7,
                             min_sample=0.02, warmup=0.05).stats
    best = min(st, key=lambda c: st[c].median)
    report.batch_chunk = best
    report.batch_chunks = (f"{_chunk_words(best)} (measured whole network at "
                           f"{'x'.join(map(str, size))}: " + ", ".join(
                               f"{_chunk_words(c)} {st[c].median * 1e3:.2f} ms" for c in sizes)
                           + ")")
    return best or batch


def _chunks_differ(nets: dict, x) -> str | None:
    """Why the network cannot run its batch a few images per call, or None: its output must
    be one tensor with the batch first, the same run whole and in chunks (within the gate's
    float32 tolerance; a model mixing images across the batch is not)."""
    from .gate import TOLERANCE, relative_error

    try:
        with torch.inference_mode():
            whole = nets[0](x)
            if not isinstance(whole, torch.Tensor) or whole.dim() == 0 or len(whole) != len(x):
                return "not run in chunks: its output is not one tensor with the batch first"
            outs = {c: net(x) for c, net in nets.items() if c}
    except Exception as e:  # noqa: BLE001 - what a model of any kind may raise
        return f"not run in chunks: {type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"
    for c, y in outs.items():
        if y.shape != whole.shape or not relative_error(y, whole) <= TOLERANCE["float32"]:
            return f"not run in chunks: {_chunk_words(c)} gives another answer than the whole batch"
    return None


def _chunk_words(chunk: int) -> str:
    return "whole batch" if not chunk else f"{chunk} image{'s' if chunk > 1 else ''} per call"


def _choose_dense_linear(m: nn.Module, rows: int = 1, decided: list | None = None) -> None:
    """Each ``nn.Linear`` left dense runs through :class:`GemvLinear` where the C++ pass was
    faster for ``rows`` images (the images per call the network runs): both timed interleaved on
    a random input of the layer's width (``Report.dense_linear`` gives both times); more than
    ``GEMV_MAX_ROWS`` images run PyTorch's Linear either way. ``decided``: the layers an earlier
    measurement gave the C++ pass (nothing is timed)."""
    from .timing import interleaved_cpu

    report = m.sparsify_report
    for name, lin in list(m.named_modules()):
        if type(lin) is not nn.Linear or lin.weight.dtype != torch.float32:
            continue
        if decided is not None:
            use = name in decided
            report.dense_linear[name] = (f"{'C++ pass' if use else 'PyTorch'} (as decided "
                                         f"before, not measured here)")
            if use:
                _set(m, name, GemvLinear(lin))
            continue
        if rows > GEMV_MAX_ROWS:
            report.dense_linear[name] = (f"PyTorch ({rows} images per call: the C++ pass takes "
                                         f"at most {GEMV_MAX_ROWS})")
            continue
        x, gemv = torch.randn(rows, lin.in_features), GemvLinear(lin)
        with torch.inference_mode():
            st = interleaved_cpu({"pytorch": (lin, x), "gemv": (gemv, x)}, rounds=5,
                                 min_sample=0.01, warmup=0.01).stats
        t = {k: v.median * 1e3 for k, v in st.items()}
        best = "gemv" if t["gemv"] < t["pytorch"] else "pytorch"
        report.dense_linear[name] = (f"{'C++ pass' if best == 'gemv' else 'PyTorch'} "
                                     f"({lin.in_features}->{lin.out_features} at batch {rows}: "
                                     f"C++ pass {t['gemv']:.2f} ms, PyTorch {t['pytorch']:.2f} ms)")
        if best == "gemv":
            _set(m, name, gemv)


def _sparsify_linears(m, input_size, pattern, sparsity, by_shape, dev, report) -> None:
    done, kept = [], {}
    for name, layer in _linears(m, input_size).items():
        lin = m.get_submodule(name)
        entry = by_shape.get(layer.shape_str)
        if entry is not None and kernels.get(entry.kernel).pattern != "dense":
            k, cfg, why = kernels.get(entry.kernel), dict(entry.config), None
        else:
            k, cfg, why = default_kernel(layer, pattern, sparsity, dev)
        if why:
            kept[name] = report.dense[name] = why
            continue
        run = k.prepare(layer, lin.weight.detach().view(*lin.weight.shape, 1, 1)
                        .to(dev.tensor_device), sparsity, cfg)
        bias = None if lin.bias is None else lin.bias.detach().to(dev.tensor_device)
        _set(m, name, SparseLinear(layer, run, bias, k.name, cfg, sparsity=sparsity))
        report.replaced[name] = {"kernel": k.name, "config": json.dumps(cfg, sort_keys=True)}
        done.append(name)
    report.classifier = (f"sparsified: {len(done)} Linear layer(s) ({', '.join(done)})"
                         if done else "kept dense: no Linear layer could be sparsified")
    if kept:
        report.classifier += f"; kept dense: {', '.join(kept)}"


class _ResidualEnd(nn.Module):
    """The reference for a layer that adds its block's shortcut in its epilogue:
    ``relu(conv(x) + residual)`` (the ReLU when the layer fused one)."""

    def __init__(self, conv: nn.Conv2d, relu: bool):
        super().__init__()
        self.conv, self.relu = conv, relu

    def forward(self, x, residual=None):
        y = self.conv(x)
        y = y if residual is None else y + residual
        return F.relu(y) if self.relu else y


def masked_dense(sparse: nn.Module) -> nn.Module:
    """The reference: the sparse model with each ``SparseConv2d`` turned back into a plain
    convolution over its ``masked_weight`` (same masks, same folded biases; a fused ReLU or
    shortcut addition after it); a max-pool run by the C++ pass is PyTorch's again, so the
    reference holds PyTorch operations only (the peer engines export it to ONNX), as is a
    convolution run with its ReLU and max-pool as one pass (:class:`ConvPool`)."""
    ref = copy.deepcopy(sparse).cpu()
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, NchwMaxPool):
            _set(ref, name, mod.pool)
        elif isinstance(mod, ConvPool):
            _set(ref, name, nn.Sequential(mod.conv, *[nn.ReLU()] * mod.relu, mod.pool))
        elif isinstance(mod, GemvLinear):
            _set(ref, name, mod.lin)
        elif isinstance(mod, SparseLinear):
            lin = nn.Linear(mod.layer.cin, mod.layer.cout, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.masked_weight.cpu().view(mod.layer.cout, mod.layer.cin))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias.cpu())
            _set(ref, name, nn.Sequential(lin, nn.ReLU()) if mod.relu else lin)
        elif isinstance(mod, SparseConv2d):  # NCHW in and out; a fused ReLU runs after it
            lay = mod.layer
            conv = nn.Conv2d(lay.cin, lay.cout, (lay.kh, lay.kw), stride=lay.stride,
                             padding=lay.padding, dilation=lay.dilation, groups=lay.groups,
                             bias=mod.bias is not None)
            with torch.no_grad():
                conv.weight.copy_(mod.masked_weight.cpu())
                if mod.bias is not None:
                    conv.bias.copy_(mod.bias.cpu())
            _set(ref, name, _ResidualEnd(conv, mod.relu) if mod.residual
                 else nn.Sequential(conv, nn.ReLU()) if mod.relu else conv)
    return ref


def build_case(case, decisions: dict | None = None) -> tuple:
    """For an ``E2ECase``: (the catalogued network as built, the network as sparsify prepares
    it with nothing fused, the network as deployed: epilogues fused and the layout handed over
    between layers). ``decisions``: as ``sparsify``'s."""
    from shapes import models

    model = models.build(case.net)
    unfused = sparsify(model, case.pattern, case.sparsity, plan=case.plan,
                       device=case.device.value, input_size=(3, case.size, case.size),
                       net=case.net, batch=case.batch, fuse=False, linear=case.classifier,
                       decisions=decisions)
    fused = fuse_layers(unfused, handover=True) if unfused.sparsify_report.replaced else unfused
    return model, unfused, fused
