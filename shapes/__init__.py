"""Convolution layer catalogs.

``load(net)`` returns every convolution of a network as :class:`ConvLayer` records, in
definition order; ``unique(layers)`` merges identical shapes into one record whose ``count`` says
how often the shape occurs, so a sweep times each shape once and weights it by ``count``.
``from_model(module, input_size)`` extracts the same records from any torch module with forward
hooks, and ``load_csv(path)`` reads user-supplied shapes.

Catalog files live in ``shapes/data/<net>.csv`` (224x224 input, torchvision module names).
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).parent / "data"
NETS = ("resnet50", "vgg19", "resnet18", "squeezenet1_1")
_INT_FIELDS = ("index", "cin", "cout", "kh", "kw", "stride", "padding", "h", "w", "dilation",
               "groups", "count")


@dataclass(frozen=True)
class ConvLayer:
    """One 2-D convolution: NCHW input of size ``h x w``, square stride/padding/dilation."""

    net: str
    name: str
    index: int
    cin: int
    cout: int
    kh: int
    kw: int
    stride: int
    padding: int
    h: int
    w: int
    dilation: int = 1
    groups: int = 1
    count: int = 1

    def __post_init__(self):
        for f in _INT_FIELDS:
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"ConvLayer.{f} must be an int, got {v!r}")
        for f in ("cin", "cout", "kh", "kw", "stride", "h", "w", "dilation", "groups", "count"):
            if getattr(self, f) < 1:
                raise ValueError(f"ConvLayer.{f} must be >= 1, got {getattr(self, f)}")
        if self.padding < 0:
            raise ValueError(f"ConvLayer.padding must be >= 0, got {self.padding}")
        if self.cin % self.groups or self.cout % self.groups:
            raise ValueError(f"groups={self.groups} must divide cin={self.cin} and cout={self.cout}")
        if self.oh < 1 or self.ow < 1:
            raise ValueError(f"layer {self.name}: output size {self.oh}x{self.ow} is empty")

    @property
    def oh(self) -> int:
        return (self.h + 2 * self.padding - self.dilation * (self.kh - 1) - 1) // self.stride + 1

    @property
    def ow(self) -> int:
        return (self.w + 2 * self.padding - self.dilation * (self.kw - 1) - 1) // self.stride + 1

    def macs(self, batch: int = 1) -> int:
        return batch * self.cout * self.oh * self.ow * (self.cin // self.groups) * self.kh * self.kw

    def flops(self, batch: int = 1) -> int:
        """2 x multiply-accumulates of one forward pass at this batch size."""
        return 2 * self.macs(batch)

    @property
    def shape_key(self) -> tuple:
        """Everything that decides the cost of the convolution (not its name or position)."""
        return (self.cin, self.cout, self.kh, self.kw, self.stride, self.padding, self.h, self.w,
                self.dilation, self.groups)

    @property
    def shape_str(self) -> str:
        s = f"{self.cin}->{self.cout} {self.kh}x{self.kw}"
        if self.stride != 1:
            s += f" s{self.stride}"
        if self.padding:
            s += f" p{self.padding}"
        return s + f" @{self.h}x{self.w}"

    def scaled(self, h: int, w: int) -> ConvLayer:
        """The same layer on a smaller (or larger) input, for quick correctness checks."""
        return dataclasses.replace(self, h=h, w=w)


def _rows_to_layers(rows, source: str) -> list[ConvLayer]:
    out = []
    names = {f.name for f in dataclasses.fields(ConvLayer)}
    required = names - {"dilation", "groups", "count"}
    for lineno, row in enumerate(rows, start=2):
        row = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
        missing = required - {k for k, v in row.items() if v not in (None, "")}
        if missing:
            raise ValueError(f"{source}:{lineno}: missing column(s) {sorted(missing)}; "
                             f"a shapes CSV needs {sorted(required)}")
        kw = {}
        for k, v in row.items():
            if k not in names or v in (None, ""):
                continue
            if k in _INT_FIELDS:
                try:
                    kw[k] = int(v)
                except ValueError:
                    raise ValueError(f"{source}:{lineno}: column {k!r} must be an integer, "
                                     f"got {v!r}") from None
            else:
                kw[k] = v
        try:
            out.append(ConvLayer(**kw))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}:{lineno}: {e}") from None
    return out


def load(net: str) -> list[ConvLayer]:
    """Every convolution of ``net`` (one of :data:`NETS`) at 224x224, in definition order."""
    if net not in NETS:
        raise ValueError(f"unknown net {net!r}; valid: {', '.join(NETS)}")
    path = DATA / f"{net}.csv"
    with path.open(newline="") as f:
        return _rows_to_layers(csv.DictReader(f), str(path))


def load_csv(path: str | Path, net: str | None = None) -> list[ConvLayer]:
    """User-supplied shapes: a CSV with the ConvLayer field names as header.

    ``net`` and ``index`` may be omitted (net defaults to the file stem, index to row order).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"shapes file {str(path)!r} does not exist")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"shapes file {str(path)!r} holds no layers: a header line (e.g. "
                         f"name,cin,cout,kh,kw,stride,padding,h,w) and one line per layer")
    for i, r in enumerate(rows):
        r.setdefault("net", net or path.stem)
        if not r.get("net"):
            r["net"] = net or path.stem
        if not r.get("index"):
            r["index"] = str(i)
    return _rows_to_layers(rows, str(path))


def save_csv(layers: list[ConvLayer], path: str | Path) -> None:
    fields = [f.name for f in dataclasses.fields(ConvLayer)]
    with Path(path).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for layer in layers:
            w.writerow(dataclasses.asdict(layer))


def unique(layers: list[ConvLayer]) -> list[ConvLayer]:
    """Merge identical shapes: the first occurrence is kept, its ``count`` summed over repeats."""
    first: dict[tuple, ConvLayer] = {}
    counts: dict[tuple, int] = {}
    for layer in layers:
        k = (layer.net, layer.shape_key)
        first.setdefault(k, layer)
        counts[k] = counts.get(k, 0) + layer.count
    return [dataclasses.replace(first[k], count=counts[k]) for k in first]


def total_macs(layers: list[ConvLayer], batch: int = 1) -> int:
    return sum(layer.macs(batch) * layer.count for layer in layers)


def from_model(module, input_size, net: str = "model") -> list[ConvLayer]:
    """Every ``nn.Conv2d`` that runs in ``module``'s forward pass, in execution order.

    ``input_size`` is ``(C, H, W)`` or ``(N, C, H, W)``; the model runs once on zeros under
    ``torch.no_grad()``. Non-square kernels are kept; stride, padding and dilation must be
    square (the harness's kernels assume so) or a ValueError names the offending layer.
    """
    import torch
    from torch import nn

    size = tuple(input_size)
    if len(size) == 3:
        size = (1,) + size
    if len(size) != 4:
        raise ValueError(f"input_size must be (C, H, W) or (N, C, H, W), got {input_size!r}")
    names = {m: n for n, m in module.named_modules()}
    seen: list[ConvLayer] = []

    def hook(mod, inputs, _output):
        x = inputs[0]
        pairs = {"stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation}
        if isinstance(mod.padding, str):
            raise ValueError(f"{names[mod]}: string padding {mod.padding!r} is not supported")
        for k, v in pairs.items():
            if v[0] != v[1]:
                raise ValueError(f"{names[mod]}: non-square {k} {tuple(v)} is not supported")
        seen.append(ConvLayer(net=net, name=names[mod], index=len(seen), cin=mod.in_channels,
                              cout=mod.out_channels, kh=mod.kernel_size[0], kw=mod.kernel_size[1],
                              stride=mod.stride[0], padding=mod.padding[0], h=int(x.shape[-2]),
                              w=int(x.shape[-1]), dilation=mod.dilation[0], groups=mod.groups))

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    try:
        was_training = module.training
        module.eval()
        with torch.no_grad():
            module(torch.zeros(size))
        module.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return seen
