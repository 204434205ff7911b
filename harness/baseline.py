"""The one owner of the dense baseline.

For a layer group (one layer, batch, dtype, device, thread count) the baseline is the fastest of
the baseline kernels' layouts (``dense_cpu`` or ``dense_cudnn``: NCHW and channels_last),
measured, never assumed: the fastest end to end (NCHW in and out) is the end-to-end baseline,
and the fastest with its input already in its own layout is the kernel-only baseline. The
runner, the autotuner and the analysis all ask here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pandas as pd

import kernels

from .records import Config, DenseRef, Device, GroupKey, Status

LAYOUT = "layout"
GROUP = GroupKey.columns()  # the columns of one layer group (see records.GroupKey)


def kernel_for(device: Device | str) -> kernels.Kernel:
    """The baseline kernel of a device (``dense_cpu`` or ``dense_cudnn``)."""
    kdev = Device(device).kernel_device
    found = [kernels.get(n) for n in kernels.names(device=kdev) if kernels.get(n).baseline]
    if not found:
        raise ValueError(f"no dense baseline kernel is registered for device {kdev}")
    return found[0]


def names() -> set[str]:
    return {n for n in kernels.names() if kernels.get(n).baseline}


def configs(kernel: kernels.Kernel) -> list[Config]:
    """The baseline configurations measured for every layer: one per layout."""
    return [Config({LAYOUT: v}) for v in kernel.space[LAYOUT]]


@dataclass
class Choice:
    """The best dense times seen so far in one group."""

    kernel: str | None = None
    layout: str | None = None
    seconds: float = float("inf")
    resident_layout: str | None = None
    resident_seconds: float = float("inf")

    def note(self, kernel: str, config, median_s, kernel_median_s=None) -> None:
        layout = dict(config)[LAYOUT]
        if median_s is not None and median_s == median_s and median_s < self.seconds:
            self.kernel, self.layout, self.seconds = kernel, layout, float(median_s)
        k = kernel_median_s if kernel_median_s is not None and kernel_median_s == kernel_median_s \
            else None
        if k is not None and k < self.resident_seconds:
            self.resident_layout, self.resident_seconds = layout, float(k)

    def ref(self) -> DenseRef | None:
        if self.kernel is None:
            return None
        resident = self.resident_seconds if math.isfinite(self.resident_seconds) else None
        return DenseRef(self.kernel, self.layout, self.resident_layout or self.layout,
                        self.seconds, resident)


class Baselines:
    """Best dense per group, fed with measured baseline rows as they arrive."""

    def __init__(self):
        self._best: dict[GroupKey, Choice] = {}

    def note(self, group: GroupKey, kernel: str, config, median_s, kernel_median_s=None) -> None:
        self._best.setdefault(group, Choice()).note(kernel, config, median_s, kernel_median_s)

    def ref(self, group: GroupKey) -> DenseRef | None:
        c = self._best.get(group)
        return c.ref() if c else None

    def choice(self, group: GroupKey) -> Choice | None:
        """The group's best dense times so far (None: none measured)."""
        return self._best.get(group)

    def adopt(self, group: GroupKey, choice: Choice) -> None:
        """Start a group from best dense times measured elsewhere (a stored earlier run)."""
        self._best[group] = dataclasses.replace(choice)

    def note_rows(self, df: pd.DataFrame) -> None:
        """Feed stored rows (e.g. from an interrupted earlier run of the same identity)."""
        for r in ok_rows(df).itertuples():
            self.note(GroupKey.of_row(r, identity=False), r.kernel,
                      Config.from_json(r.config), r.median_s, r.kernel_median_s)


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The measured baseline rows of a results table."""
    if df.empty:
        return df
    return df[(df.pattern == "dense") & df.kernel.isin(names()) & (df.status == Status.OK)]


def table(df: pd.DataFrame) -> pd.DataFrame:
    """Per group: the end-to-end baseline (``dense_s``, ``dense_layout``) and the kernel-only
    baseline time (``dense_kernel_s``), with the layer's count, shape and flops."""
    cols = GROUP + ["dense_s", "dense_kernel_s", "dense_layout", "count", "shape", "flops",
                    "layer_index"]
    d = ok_rows(df)
    if d.empty:
        return pd.DataFrame(columns=cols)
    d = d.assign(dense_layout=d.config.map(lambda c: Config.from_json(c)[LAYOUT]))
    best = d.sort_values("median_s").groupby(GROUP, as_index=False).first()
    kern = d.groupby(GROUP, as_index=False)["kernel_median_s"].min()
    best = best.merge(kern.rename(columns={"kernel_median_s": "dense_kernel_s"}), on=GROUP)
    return best.rename(columns={"median_s": "dense_s"})[cols]
