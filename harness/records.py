"""The typed records of the harness: what a case is, what its measurement holds, the states the
code branches on, and the messages the runner and its worker process exchange.

Every record that crosses a process or a file is a frozen dataclass defined here; the results
store derives its columns from :class:`Measurement`'s fields. The enum values are the only
spelling of a status anywhere: the store writes ``Status.OK.value`` and reads it back with
``Status(text)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from shapes import ConvLayer


class Status(str, Enum):
    """Outcome of one case."""

    OK = "ok"
    INCORRECT = "incorrect"
    UNSUPPORTED = "unsupported"
    COMPILE_ERROR = "compile_error"
    RUNTIME_ERROR = "runtime_error"
    TIMEOUT = "timeout"

    @property
    def failed(self) -> bool:
        """Something went wrong (as opposed to measured, or not applicable by design)."""
        return self not in (Status.OK, Status.UNSUPPORTED)

    def __str__(self) -> str:
        return self.value


class StepStatus(str, Enum):
    """How one step of a GPU lease ended (``harness.lease``)."""

    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"  # it would have overrun the deadline: not started
    CUT = "cut"  # stopped at its time share (or from outside); what it measured is kept


class RunStatus(str, Enum):
    """State of one invocation of a command that writes measurements."""

    RUNNING = "running"
    FINISHED = "finished"
    STOPPED = "stopped"  # Ctrl-C: the case in flight finished, the rest was not run
    ABORTED = "aborted"  # a second Ctrl-C
    FAILED = "failed"  # the sweep died of an error

    def __str__(self) -> str:
        return self.value


class Device(str, Enum):
    """Where a case runs. ``cuda-interpret`` runs the GPU kernels through Triton's interpreter on
    CPU tensors (cuDNN dense becomes ``F.conv2d`` on the CPU): a pipeline check whose timings are
    never GPU timings and never mix with ``cuda`` rows."""

    CPU = "cpu"
    CUDA = "cuda"
    CUDA_INTERPRET = "cuda-interpret"

    @property
    def kernel_device(self) -> str:
        """The ``Kernel.device`` of the kernels this device runs."""
        return "cpu" if self is Device.CPU else "cuda"

    @property
    def tensor_device(self) -> str:
        """The torch device the tensors live on."""
        return "cuda" if self is Device.CUDA else "cpu"

    @property
    def interpreted(self) -> bool:
        return self is Device.CUDA_INTERPRET

    def __str__(self) -> str:
        return self.value


class TimingMode(str, Enum):
    """What clock timed a row: CUDA events around CUDA-graph replays (``graph``) or around eager
    launches (``eager``, where a variant could not be captured or its replay was not faithful),
    or the host clock (``host``: CPU kernels, and the interpreter's pipeline check)."""

    GRAPH = "graph"
    EAGER = "eager"
    HOST = "host"

    def __str__(self) -> str:
        return self.value


class Config(Mapping):
    """A kernel configuration: an immutable, hashable mapping of parameter -> value, compared
    equal to a plain dict with the same items."""

    __slots__ = ("_items",)

    def __init__(self, items=()):
        d = dict(items.items() if isinstance(items, Mapping) else items)
        object.__setattr__(self, "_items", tuple(sorted(d.items())))

    def __getitem__(self, key):
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self):
        return (k for k, _ in self._items)

    def __len__(self):
        return len(self._items)

    def __hash__(self):
        return hash(self._items)

    def __eq__(self, other):
        if isinstance(other, Config):
            return self._items == other._items
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other.items())
        return NotImplemented

    def __setattr__(self, *_):
        raise AttributeError("Config is immutable")

    def __reduce__(self):
        return (Config, (dict(self._items),))

    def __repr__(self):
        return f"Config({dict(self._items)!r})"

    def replace(self, **changes) -> Config:
        return Config({**dict(self._items), **changes})

    def to_json(self) -> str:
        return json.dumps(dict(self._items), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> Config:
        return cls(json.loads(text) if text else {})


@dataclass(frozen=True)
class Candidate:
    """One point an autotuning strategy can choose: a kernel and its configuration."""

    kernel: str
    config: Config

    def __post_init__(self):
        if not isinstance(self.config, Config):
            object.__setattr__(self, "config", Config(self.config))

    def label(self) -> str:
        return f"{self.kernel} {self.config.to_json()}"


def sql_row(record, bools=()) -> dict:
    """A record's fields as one store row: enums by value, the ``bools`` as 0/1, NaN as NULL."""
    out = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    for k, v in out.items():
        if isinstance(v, Enum):
            out[k] = v.value
        elif k in bools and v is not None:
            out[k] = int(v)
        elif isinstance(v, float) and math.isnan(v):
            out[k] = None
    return out


def default_max_contention() -> float | None:
    """``SPARSECONV_MAX_CONTENTION``: the share of a core other work may hold while a round is
    timed, if it also keeps our threads waiting for a CPU, before the round is retaken ('off':
    never retake; default 0.25; ``harness.contention``)."""
    v = os.environ.get("SPARSECONV_MAX_CONTENTION", "").strip()
    if v.lower() in ("off", "none"):
        return None
    try:
        return float(v) if v else 0.25
    except ValueError:
        raise ValueError(f"SPARSECONV_MAX_CONTENTION must be a number of cores or 'off', "
                         f"got {v!r}") from None


@dataclass(frozen=True)
class TimingOptions:
    """How a case is timed (seconds). ``resident``: also time the kernel-only path.
    ``max_contention``: a round taken while other work held more than this share of a core and
    kept our threads waiting for a CPU is retaken (``harness.contention``; None: never)."""

    rounds: int = 7
    min_sample: float = 2e-3
    warmup: float = 0.05
    time_per_case: float = 30.0
    resident: bool = True
    max_contention: float | None = field(default_factory=default_max_contention)

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if not self.min_sample >= 0 or not self.warmup >= 0 or not self.time_per_case > 0:
            raise ValueError("min_sample and warmup must be >= 0 and time_per_case > 0")


@dataclass(frozen=True)
class Case:
    """One thing to measure: (layer, batch, dtype, threads, device, pattern, sparsity, kernel,
    config), plus the hash of the kernel's source (part of its identity). ``unsupported`` holds
    the reason when the combination cannot run; such a case is recorded, never dropped."""

    layer: ConvLayer
    kernel: str
    pattern: str
    sparsity: float
    config: Config
    batch: int
    dtype: str
    device: Device
    threads: int
    source_hash: str
    param: Config = field(default_factory=Config)  # the pattern parameter(s) the sweep fixed
    unsupported: str | None = None
    # cuDNN's version on a GPU: a key of GPU rows only (CPU rows and plans do not change)
    cudnn: str | None = None

    def __post_init__(self):
        for name in ("config", "param"):
            if not isinstance(getattr(self, name), Config):
                object.__setattr__(self, name, Config(getattr(self, name)))
        object.__setattr__(self, "device", Device(self.device))

    @property
    def key(self) -> str:
        """Canonical identity of the case (with the kernel's source hash): resume matches on it
        together with the machine and software identity of the run."""
        lay = self.layer
        return json.dumps({
            "net": lay.net, "layer": lay.name, "shape": list(lay.shape_key),
            "batch": self.batch, "dtype": self.dtype, "device": self.device.value,
            "threads": self.threads, "kernel": self.kernel, "source": self.source_hash,
            "sparsity": self.sparsity, "config": dict(self.config),
            **({"cudnn": self.cudnn} if self.cudnn is not None else {})}, sort_keys=True)

    @property
    def group(self) -> GroupKey:
        """The cases whose times may be compared (within this run): one layer, batch, dtype,
        device, threads."""
        return GroupKey(self.layer.net, self.layer.name, self.batch, self.dtype,
                        self.device.value, self.threads)

    @property
    def is_dense(self) -> bool:
        return self.pattern == "dense"


@dataclass(frozen=True)
class GroupKey:
    """Which rows may be compared: one layer of one net, at one batch, dtype, device and thread
    count, measured under one machine and software identity. Every ratio, every dense baseline
    and every table of speedups is taken inside one group; this is the one place that says what
    a group is. ``identity`` is None for a case inside one run (the run's identity is implied);
    rows of a results table carry it in their ``fp_hash`` column."""

    net: str
    layer: str
    batch: int
    dtype: str
    device: str
    threads: int
    identity: str | None = None

    # field -> the results-table column that holds it, in the order tables group by
    COLUMNS = {"identity": "fp_hash", "net": "net", "layer": "layer", "batch": "batch",
               "dtype": "dtype", "device": "device", "threads": "threads"}

    @classmethod
    def columns(cls, layer: bool = True) -> list[str]:
        """The columns of a results table that hold a group key; ``layer=False``: the group
        over every layer of a net (a network-level figure)."""
        return [c for f, c in cls.COLUMNS.items() if layer or f != "layer"]

    @classmethod
    def of_row(cls, row, identity: bool = True) -> GroupKey:
        """The group of a results-table row (a namedtuple or a Series); ``identity=False``:
        within one run, as a ``Case.group`` is."""
        r = row._asdict() if hasattr(row, "_asdict") else row  # a Series' .dtype is its own
        return cls(net=r["net"], layer=r["layer"], batch=int(r["batch"]), dtype=r["dtype"],
                   device=str(r["device"]), threads=int(r["threads"]),
                   identity=r["fp_hash"] if identity else None)


@dataclass(frozen=True)
class DenseRef:
    """The dense baseline a sparse case is timed against (interleaved in the same run):
    ``layout`` for end to end, ``resident_layout`` for kernel-only (input already laid out)."""

    kernel: str
    layout: str
    resident_layout: str
    # the baseline rows' own medians: a dense run beside a sparse case far slower than its own
    # row means something else slowed it (harness.measure re-measures, then flags it)
    seconds: float | None = None
    resident_seconds: float | None = None


@dataclass(frozen=True)
class CaseResult:
    """What the worker returns for one case."""

    status: Status
    reason: str | None = None
    rel_err: float | None = None  # ||y - ref|| / ||ref||
    max_err: float | None = None  # max |y - ref| / (|w| * |x| conv), the element-wise bound
    tolerance: float | None = None
    density: float | None = None  # non-zeros of masked_weight / its size
    median_s: float | None = None
    iqr_s: float | None = None
    min_s: float | None = None
    noisy: bool | None = None
    reps: int | None = None
    samples: tuple = ()
    kernel_median_s: float | None = None
    kernel_iqr_s: float | None = None
    kernel_samples: tuple = ()
    dense_median_s: float | None = None
    dense_kernel_median_s: float | None = None
    dense_layout: str | None = None
    dense_samples: tuple = ()
    timing_mode: str | None = None  # TimingMode's value
    gpu_clocks: str | None = None  # JSON (harness.gpu.Watch): clocks at the timing's start, end
    gpu_others: str | None = None  # JSON: other processes NVML listed on the device meanwhile
    # trust (harness.contention, plausibility, intervals): other work's largest share of a
    # core in a kept round, our threads' largest wait for a CPU over wall time (None:
    # unreadable), rounds retaken, a kept round still contended (share and wait over their
    # limits); a ratio above the FLOP ideal re-measured, and why it stands
    contention: float | None = None
    runq_wait: float | None = None
    retaken: int | None = None
    contended: bool | None = None
    remeasured: int | None = None
    implausible: str | None = None
    # bootstrap 95% intervals of the speedups from the interleaved sample pairs (>= 5 rounds)
    speedup_lo: float | None = None
    speedup_hi: float | None = None
    kernel_speedup_lo: float | None = None
    kernel_speedup_hi: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "status", Status(self.status))


@dataclass(frozen=True)
class Measurement:
    """One stored row: the case, the identity of the run that measured it, and the result.
    The store's ``measurements`` table has exactly these columns."""

    run_id: int
    fp_hash: str  # identity of machine + software (see harness.env)
    machine_hash: str
    case_key: str
    source_hash: str
    net: str
    layer: str
    layer_index: int
    shape: str
    count: int
    cin: int
    cout: int
    kh: int
    kw: int
    stride: int
    padding: int
    h: int
    w: int
    batch: int
    dtype: str
    device: str
    threads: int
    pattern: str
    sparsity: float
    param: str  # JSON
    kernel: str
    config: str  # JSON
    status: Status
    reason: str | None = None
    rel_err: float | None = None
    max_err: float | None = None
    tolerance: float | None = None
    density: float | None = None
    median_s: float | None = None
    iqr_s: float | None = None
    min_s: float | None = None
    noisy: bool | None = None
    kernel_median_s: float | None = None
    kernel_iqr_s: float | None = None
    dense_median_s: float | None = None
    dense_kernel_median_s: float | None = None
    dense_layout: str | None = None
    samples: str | None = None  # JSON lists
    kernel_samples: str | None = None
    dense_samples: str | None = None
    reps: int | None = None
    flops: float | None = None
    node: str | None = None  # where it was measured (host name or cluster node id)
    created: float | None = None
    # added in place as nullable columns (the store adds a field's column to an older file)
    timing_mode: str | None = None  # TimingMode: graph, eager or host
    gpu_clocks: str | None = None  # JSON: SM and memory clocks at the timing's start and end
    gpu_others: str | None = None  # JSON: other processes on the GPU while the case ran
    cudnn: str | None = None  # cuDNN version (GPU rows; part of their case key)
    # trust (harness.contention, plausibility, intervals): other work's largest share of a
    # core in a kept round, our threads' largest wait for a CPU over wall time (None:
    # unreadable), rounds retaken, a kept round still contended (share and wait over their
    # limits); a ratio above the FLOP ideal re-measured, and why it stands
    contention: float | None = None
    runq_wait: float | None = None
    retaken: int | None = None
    contended: bool | None = None
    remeasured: int | None = None
    implausible: str | None = None
    # bootstrap 95% intervals of the speedups from the interleaved sample pairs (>= 5 rounds)
    speedup_lo: float | None = None
    speedup_hi: float | None = None
    kernel_speedup_lo: float | None = None
    kernel_speedup_hi: float | None = None

    @classmethod
    def of(cls, case: Case, result: CaseResult, run_id: int, fp_hash: str, machine_hash: str,
           node: str | None = None, created: float | None = None) -> Measurement:
        lay = case.layer
        res = dataclasses.asdict(result)
        for k in ("samples", "kernel_samples", "dense_samples"):
            res[k] = json.dumps(list(res[k])) if res[k] else None
        res["status"] = result.status
        return cls(run_id=run_id, fp_hash=fp_hash, machine_hash=machine_hash,
                   case_key=case.key, source_hash=case.source_hash, net=lay.net,
                   layer=lay.name, layer_index=lay.index, shape=lay.shape_str, count=lay.count,
                   cin=lay.cin, cout=lay.cout, kh=lay.kh, kw=lay.kw, stride=lay.stride,
                   padding=lay.padding, h=lay.h, w=lay.w, batch=case.batch, dtype=case.dtype,
                   device=case.device.value, threads=case.threads, pattern=case.pattern,
                   sparsity=case.sparsity, param=case.param.to_json(), kernel=case.kernel,
                   config=case.config.to_json(), flops=float(lay.flops(case.batch)), node=node,
                   created=created, cudnn=case.cudnn, **res)

    def row(self) -> dict:
        """Column -> SQL value."""
        return sql_row(self, ("noisy", "contended"))


# ---- worker protocol ------------------------------------------------------------------------
@dataclass(frozen=True)
class InitRequest:
    """Load (and build) these kernels; answer which cannot run here."""

    kernels: tuple[str, ...]


@dataclass(frozen=True)
class KernelState:
    status: Status  # OK, UNSUPPORTED (not on this machine) or COMPILE_ERROR (build failed)
    reason: str | None = None


@dataclass(frozen=True)
class InitReply:
    states: dict  # kernel name -> KernelState


@dataclass(frozen=True)
class CaseRequest:
    case: Case
    timing: TimingOptions
    dense: DenseRef | None = None


@dataclass(frozen=True)
class RaceRequest:
    """Time several candidates of one layer interleaved in one run (each gated first)."""

    layer: ConvLayer
    batch: int
    dtype: str
    device: Device
    threads: int
    sparsity: float
    cands: tuple  # of Candidate
    timing: TimingOptions
    resident: bool = False  # also time each candidate with its input already laid out


@dataclass(frozen=True)
class RaceReply:
    medians: tuple  # seconds or None per candidate
    reasons: tuple  # None or why the candidate was not timed
    # per candidate: the fraction of interleaved rounds in which it was faster than the first
    # candidate (None where either was not timed)
    win_rates: tuple = ()
    # per candidate: its samples, one per interleaved round (() where not timed), end to end
    # and, with ``resident``, kernel-only
    samples: tuple = ()
    resident_samples: tuple = ()
    contention: float | None = None  # the largest other-work share of a kept round
    contended: bool = False


@dataclass(frozen=True)
class Confirmation:
    """One candidate of a confirmation race, a row of the confirmations table: after a sweep,
    the best and the runner-up configuration of a layer, pattern and sparsity race the dense
    baseline interleaved (``harness.confirm``). ``measurement_id`` is the sweep row it
    confirms; its figures, not the sweep row's, feed every best figure."""

    measurement_id: int
    case_key: str
    fp_hash: str
    run_id: int
    rank: int  # 1: the sweep's best, 2: its runner-up
    median_s: float | None = None  # this candidate's median in the race, end to end
    dense_median_s: float | None = None  # the dense baseline's, in the same race
    speedup: float | None = None  # end to end, dense median / this median, from the race
    speedup_lo: float | None = None
    speedup_hi: float | None = None
    kernel_speedup: float | None = None
    kernel_speedup_lo: float | None = None
    kernel_speedup_hi: float | None = None
    # the other raced candidate's time over this one's (above 1: this one is faster)
    vs_other: float | None = None
    vs_other_lo: float | None = None
    vs_other_hi: float | None = None
    contention: float | None = None
    contended: bool = False
    implausible: str | None = None  # a ratio above the FLOP ideal in the race too
    reason: str | None = None  # why the candidate was not timed
    created: float | None = None

    def row(self) -> dict:
        return sql_row(self, ("contended",))


@dataclass(frozen=True)
class StopRequest:
    pass


@dataclass(frozen=True)
class WorkerReady:
    """A worker's first message: its imports are done and it takes requests."""

    pid: int


@dataclass(frozen=True)
class WorkerFailure:
    """The worker caught an exception outside any case's own handling."""

    reason: str
    traceback: str = ""


# ---- whole networks --------------------------------------------------------------------------
@dataclass(frozen=True)
class E2ECase:
    """One whole-network measurement: a catalogued network with one pattern and sparsity, with
    the plan to use (None: each layer's default kernel and configuration)."""

    net: str
    pattern: str
    sparsity: float
    batch: int
    dtype: str
    device: Device
    threads: int
    size: int  # input height and width
    plan: dict | None = None
    plan_file: str | None = None
    source_hash: str = ""  # of every kernel the network may use
    classifier: bool = False  # sparsify the Linear layers too
    cudnn: str | None = None  # GPU: cuDNN's version, part of the key (as Case's)
    engines: str = ""  # JSON: engine -> its version (None: not available here); part of the key

    def __post_init__(self):
        object.__setattr__(self, "device", Device(self.device))

    @property
    def key(self) -> str:
        plan = json.dumps(self.plan, sort_keys=True, default=str) if self.plan else None
        return json.dumps({"net": self.net, "pattern": self.pattern, "sparsity": self.sparsity,
                           "batch": self.batch, "dtype": self.dtype, "device": self.device.value,
                           "threads": self.threads, "size": self.size, "plan": plan,
                           "source": self.source_hash,
                           **({"classifier": True} if self.classifier else {}),
                           **({"cudnn": self.cudnn} if self.cudnn is not None else {}),
                           **({"engines": self.engines} if self.engines else {})},
                          sort_keys=True)

    def engine_names(self) -> list[str]:
        return list(json.loads(self.engines)) if self.engines else []


@dataclass(frozen=True)
class E2ERequest:
    """``alone``: also time each engine, and the project's network, alone in a process of its
    own (the fairness check against the interleaved figures)."""

    case: E2ECase
    timing: TimingOptions
    dense_compile: bool = False
    alone: bool = True


@dataclass(frozen=True)
class E2EResult:
    """What the worker returns for one network. Times are medians in seconds; ``conv_*`` are
    the per-layer convolution times (count-weighted sums) measured in the same run."""

    status: Status
    reason: str | None = None
    rel_err: float | None = None
    replaced: int | None = None
    kept_dense: str | None = None  # JSON: layer -> why it stays dense
    kernels: str | None = None  # JSON: kernel -> how many layers run it
    dense_nchw_s: float | None = None
    dense_cl_s: float | None = None
    dense_compiled_s: float | None = None
    sparse_s: float | None = None  # fused (epilogues in the kernels, layout handover)
    sparse_epilogue_s: float | None = None  # epilogues fused, NCHW between every layer
    sparse_unfused_s: float | None = None  # bias and ReLU as separate ops, NCHW between layers
    # the fused network with the whole batch in one call, where it runs a few images per call
    sparse_whole_s: float | None = None
    batch_chunk: str | None = None  # images per call of the sparse network, and the measurement
    relu_fused: int | None = None
    handover: str | None = None  # JSON: [producer, consumer(, seconds saved)] per layer pair
    # handing over in the kernel's layout (the time saved measured per pair, interleaved)
    # JSON: [layer(, seconds saved)] per layer ending a residual block with the shortcut
    # addition and its ReLU in the kernel (the time saved measured per layer, interleaved), and
    # [layer, why] per one measured slower fused (the addition runs after the kernel)
    residual: str | None = None
    # JSON: [layer, seconds saved] per dense convolution run with its ReLU and max-pool as one
    # pass (sparse_model.ConvPool; the time saved measured per layer, interleaved)
    conv_pool: str | None = None
    # JSON: operation kind -> seconds per run, timed node by node inside the deployed network
    # (e2e.in_network): where the time outside the sparse convolutions goes
    in_network: str | None = None
    # the sparse convolutions timed where they run in the network (sparse_first_s) and each
    # called again right after it (its data now in the caches; e2e.in_network, runs of their
    # own): the difference is at most what waiting for memory costs them
    sparse_first_s: float | None = None
    sparse_repeated_s: float | None = None
    dense_ops: str | None = None  # the sparse network's dense operations: layout and why
    strided: str | None = None  # JSON: pair into a stride-2 consumer -> handed over or not, why
    conv_dense_s: float | None = None
    conv_sparse_s: float | None = None
    # on a GPU: the same networks captured in CUDA graphs and replayed (no launch overhead)
    dense_graph_s: float | None = None  # the faster dense layout
    sparse_graph_s: float | None = None
    graph_note: str | None = None  # why no graph was captured
    noisy: bool | None = None
    samples: str | None = None  # JSON: variant -> samples
    gpu_clocks: str | None = None  # as CaseResult's, over the whole network's timing
    gpu_others: str | None = None
    engines: str | None = None  # JSON: one EngineResult dict per engine and network
    contention: float | None = None  # as CaseResult's, over the whole network's timing
    retaken: int | None = None
    contended: bool | None = None
    remeasured: int | None = None  # timed once more for a ratio above the FLOP ideal
    implausible: str | None = None  # why the ratio stayed there

    def __post_init__(self):
        object.__setattr__(self, "status", Status(self.status))


# where an engine's interleaved and alone medians differ by more than this, the alone one is
# the figure reported (engines slow each other down inside one process)
ALONE_DIFFERS = 0.10


@dataclass(frozen=True)
class EngineResult:
    """One engine on one network in an e2e run (``variant`` is ``engine@network``; the
    project's own network is ``project@sparse``). ``latency_s`` is the figure reported: the
    interleaved median, or the alone one where they differ by more than ``ALONE_DIFFERS``, for
    this engine or another of the run (``one_source``)."""

    variant: str
    engine: str
    network: str  # dense, masked, sparse
    role: str  # dense (a dense baseline), peer, control, project
    label: str
    status: str
    version: str | None = None
    settings: dict | None = None
    reason: str | None = None
    rel_err: float | None = None
    interleaved_s: float | None = None
    alone_s: float | None = None
    latency_s: float | None = None
    cpu_per_wall: float | None = None
    alone_cpu_per_wall: float | None = None
    noisy: bool | None = None
    alone_note: str | None = None
    # 95% bootstrap interval (harness.timing.ratio_interval) of this engine's time over the
    # project's network's, from the interleaved rounds that timed both (above 1: the project
    # is faster); None from fewer than 5 rounds, and for the project's own row
    vs_project_lo: float | None = None
    vs_project_hi: float | None = None

    def with_alone(self, alone_s: float | None, cpu: float | None = None,
                   note: str | None = None) -> EngineResult:
        lat, why = self.interleaved_s, note
        if alone_s and self.interleaved_s:
            diff = alone_s / self.interleaved_s - 1
            if abs(diff) > ALONE_DIFFERS:
                lat = alone_s
                why = (f"alone {alone_s * 1e3:.2f} ms differs from interleaved "
                       f"{self.interleaved_s * 1e3:.2f} ms by {diff:+.0%}: alone reported")
        return dataclasses.replace(self, alone_s=alone_s, alone_cpu_per_wall=cpu,
                                   latency_s=lat, alone_note=why)


def one_source(rows: dict, groups: int = 1) -> dict:
    """``rows`` ({variant: EngineResult}) reported from one kind of figure: where any engine's
    alone figure is reported (``with_alone``), every engine timed alone reports its alone one
    too. The alone processes are timed in interleaved rounds of their own, as the engines in
    the run are, so the alone figures share the machine's moments with each other but not with
    the interleaved ones: a headline ratio of an alone figure over an interleaved one would
    compare two stretches of a machine that runs faster and slower by turns. Where the alone
    figures do not share their moments either (an engine measured in the run but not timed
    alone, or alone processes run in ``groups`` > 1 because memory held only some at once),
    every engine reports its interleaved figure, the note saying why."""
    def alone(r):
        return r.alone_s is not None and r.latency_s == r.alone_s != r.interleaved_s

    switched = [r.variant for r in rows.values() if alone(r)]
    if not switched:
        return dict(rows)
    missing = [r.variant for r in rows.values()
               if r.status == Status.OK.value and r.interleaved_s and not r.alone_s]
    if missing or groups > 1:
        why = (f"not timed alone: {', '.join(missing)}" if missing else
               f"the alone processes ran in {groups} groups (memory), at different moments")
        return {k: dataclasses.replace(r, latency_s=r.interleaved_s,
                                       alone_note=f"{r.alone_note}; interleaved reported, as "
                                                  f"for every engine of the run ({why})")
                if alone(r) else r for k, r in rows.items()}
    why = (f"alone {{:.2f}} ms reported, as for every engine of the run: "
           f"{', '.join(switched)} differ{'s' if len(switched) == 1 else ''} by more than "
           f"{ALONE_DIFFERS:.0%} (interleaved {{:.2f}} ms)")
    return {k: r if alone(r) or not r.alone_s else dataclasses.replace(
        r, latency_s=r.alone_s, alone_note=why.format(r.alone_s * 1e3, r.interleaved_s * 1e3))
        for k, r in rows.items()}


def engine_summary(engines: str | None) -> dict:
    """The headline of an e2e row from its engines: the best dense engine measured in the same
    run (and the engines it was the best of), the speedup of the project's network against it
    and against PyTorch eager (the faster layout), and against DeepSparse on the same masks."""
    rows = [EngineResult(**r) for r in json.loads(engines)] if engines else []
    ok = {r.variant: r for r in rows if r.status == Status.OK.value and r.latency_s}
    out = {k: None for k in ("best_dense_engine", "best_dense_s", "dense_engines",
                             "sparse_latency_s", "speedup_best", "eager_s", "speedup_eager",
                             "deepsparse_s", "vs_deepsparse", *INTERVAL_COLUMNS)}
    dense = {r.engine: r for r in ok.values() if r.role == "dense"}
    project = ok.get("project@sparse")
    chosen = {}  # headline column -> the engine row it is measured against
    if dense:
        best = min(dense, key=lambda e: dense[e].latency_s)
        out.update(best_dense_engine=best, best_dense_s=dense[best].latency_s,
                   dense_engines=", ".join(sorted(dense)))
        chosen["speedup_best"] = dense[best]
    eager = [dense[e] for e in ("eager_nchw", "eager_channels_last") if e in dense]
    if eager:
        chosen["speedup_eager"] = min(eager, key=lambda r: r.latency_s)
        out["eager_s"] = chosen["speedup_eager"].latency_s
    peer = [r for r in ok.values() if r.role == "peer"]
    if peer:
        chosen["vs_deepsparse"] = min(peer, key=lambda r: r.latency_s)
        out["deepsparse_s"] = chosen["vs_deepsparse"].latency_s
    if project:
        s = project.latency_s
        out["sparse_latency_s"] = s
        interleaved = project.latency_s == project.interleaved_s
        for col, r in chosen.items():
            out[col] = r.latency_s / s
            if interleaved and r.latency_s == r.interleaved_s:  # the interval's own figures
                out[f"{col}_lo"], out[f"{col}_hi"] = r.vs_project_lo, r.vs_project_hi
    return out


# each headline ratio's 95% interval, from the interleaved rounds (EngineResult.vs_project_*)
INTERVAL_COLUMNS = tuple(f"{c}_{e}" for c in ("speedup_best", "speedup_eager", "vs_deepsparse")
                         for e in ("lo", "hi"))


def handover_saved_s(handover: str | None) -> float | None:
    """Time the layout handover saves, summed over its layer pairs (each measured on its own);
    None where no pair was measured. The same for a ``residual`` or ``conv_pool`` column's
    layers."""
    pairs = json.loads(handover) if isinstance(handover, str) else []
    saved = [p[-1] for p in pairs if len(p) > 1 and not isinstance(p[-1], str)]
    return float(sum(saved)) if saved else None


def images_per_call(batch_chunk: str | None) -> str | None:
    """The ``batch_chunk`` column's choice alone: "whole batch" or the images per call."""
    if not isinstance(batch_chunk, str):
        return None
    return "whole batch" if batch_chunk.startswith("whole") else batch_chunk.split()[0]


SPARSE_CONV = "sparse convolutions"  # e2e.in_network's kind for the sparse layers


def outside_share(breakdown: dict | None) -> float | None:
    """The share of a network's in-network time (``e2e.in_network``) spent outside its sparse
    convolutions (a convolution kept dense, such as the RGB stem, counts as outside)."""
    if not breakdown:
        return None
    total = sum(breakdown.values())
    return 1 - breakdown.get(SPARSE_CONV, 0.0) / total if total > 0 else None


def _outside(in_network: str | None) -> float | None:
    return outside_share(json.loads(in_network)) if isinstance(in_network, str) else None


def residual_fused(residual: str | None) -> list:
    """The ``residual`` column's layers whose shortcut addition runs in the kernel."""
    ends = json.loads(residual) if isinstance(residual, str) else []
    return [e for e in ends if len(e) == 1 or not isinstance(e[-1], str)]


@dataclass(frozen=True)
class TuningRecord:
    """One tuning candidate as measured, a row of the tuning table (whose columns are these
    fields, as the measurements' are ``Measurement``'s). ``tune_key`` is its identity (machine
    and software, kernel and source, shape, batch, dtype, device, threads, pattern, sparsity,
    configuration); layers of one ``shape`` share records. ``config`` is canonical JSON."""

    tune_key: str
    identity: str
    kernel: str
    source_hash: str
    shape: str
    batch: int
    dtype: str
    pattern: str
    sparsity: float
    config: str
    status: str
    median_s: float | None = None
    kernel_median_s: float | None = None
    dense_median_s: float | None = None
    rel_err: float | None = None
    created: float | None = None
    # why the timing is not taken at face value (implausible, contended): never chosen
    flagged: str | None = None

    def __post_init__(self):
        if isinstance(self.config, Mapping):
            object.__setattr__(self, "config", json.dumps(dict(self.config), sort_keys=True))

    @property
    def seconds(self) -> float | None:
        """The measured median, or None where the candidate failed or was not timed."""
        med = self.median_s
        if Status(self.status) is not Status.OK or med is None or med != med:
            return None
        return float(med)


@dataclass(frozen=True)
class E2EMeasurement:
    """One stored whole-network row (the store's ``e2e`` table has exactly these columns)."""

    run_id: int
    fp_hash: str
    machine_hash: str
    case_key: str
    net: str
    pattern: str
    sparsity: float
    batch: int
    dtype: str
    device: str
    threads: int
    size: int
    plan: str | None  # the plan file used, or None for default configurations
    source_hash: str
    status: Status
    classifier: bool | None = None  # the Linear layers were sparsified too
    reason: str | None = None
    rel_err: float | None = None
    replaced: int | None = None
    kept_dense: str | None = None
    kernels: str | None = None
    dense_s: float | None = None  # the faster dense baseline
    dense_layout: str | None = None
    dense_nchw_s: float | None = None
    dense_cl_s: float | None = None
    dense_compiled_s: float | None = None
    sparse_s: float | None = None
    sparse_epilogue_s: float | None = None  # same kernels, no layout handover
    sparse_unfused_s: float | None = None  # same kernels, nothing fused
    sparse_whole_s: float | None = None  # as E2EResult's
    batch_chunk: str | None = None
    relu_fused: int | None = None
    handover: str | None = None
    residual: str | None = None  # JSON: as E2EResult's
    conv_pool: str | None = None  # JSON: as E2EResult's
    in_network: str | None = None  # JSON: as E2EResult's
    # share of the in-network time outside the sparse convolutions (from in_network)
    outside_in_network: float | None = None
    sparse_first_s: float | None = None  # as E2EResult's
    sparse_repeated_s: float | None = None
    # share of the sparse convolutions' in-network time beyond their repeated calls' (at most
    # the wait for data the other layers pushed out of the caches; below 0: repeats no faster)
    memory_wait: float | None = None
    dense_ops: str | None = None  # the sparse network's dense operations (sparsify_report)
    strided: str | None = None  # JSON: each pair into a stride-2 consumer, measured both ways
    speedup: float | None = None  # measured end to end
    conv_dense_s: float | None = None
    conv_sparse_s: float | None = None
    estimate: float | None = None  # summed-convolution speedup, same run
    outside_share: float | None = None  # share of the sparse latency outside convolutions
    dense_graph_s: float | None = None  # GPU: both networks replayed from CUDA graphs
    sparse_graph_s: float | None = None
    graph_speedup: float | None = None
    graph_note: str | None = None
    noisy: bool | None = None
    samples: str | None = None
    node: str | None = None
    created: float | None = None
    gpu_clocks: str | None = None  # added in place as nullable columns, as Measurement's
    gpu_others: str | None = None
    cudnn: str | None = None
    # every engine of the same run (EngineResult dicts, JSON) and the headline from them
    engines: str | None = None
    best_dense_engine: str | None = None
    best_dense_s: float | None = None
    dense_engines: str | None = None  # the dense engines the best was the best of
    sparse_latency_s: float | None = None  # the project's network as reported (see EngineResult)
    speedup_best: float | None = None  # against the best dense engine
    eager_s: float | None = None
    speedup_eager: float | None = None
    deepsparse_s: float | None = None  # DeepSparse on the very masked network
    vs_deepsparse: float | None = None  # deepsparse_s / sparse_latency_s: > 1, the project wins
    # 95% bootstrap intervals of the three ratios above from the run's interleaved rounds
    # (engine_summary); none where either side reports its alone figure instead
    speedup_best_lo: float | None = None
    speedup_best_hi: float | None = None
    speedup_eager_lo: float | None = None
    speedup_eager_hi: float | None = None
    vs_deepsparse_lo: float | None = None
    vs_deepsparse_hi: float | None = None
    contention: float | None = None  # other work's largest share of a core in a kept round
    retaken: int | None = None
    contended: bool | None = None
    remeasured: int | None = None
    implausible: str | None = None

    @classmethod
    def of(cls, case: E2ECase, res: E2EResult, run_id: int, fp_hash: str, machine_hash: str,
           node: str | None = None) -> E2EMeasurement:
        dense = [(t, lay) for t, lay in ((res.dense_nchw_s, "nchw"),
                                          (res.dense_cl_s, "channels_last"),
                                          (res.dense_compiled_s, "compiled")) if t]
        dense_s, layout = min(dense) if dense else (None, None)
        ok = res.status is Status.OK and dense_s and res.sparse_s
        return cls(run_id=run_id, fp_hash=fp_hash, machine_hash=machine_hash,
                   case_key=case.key, net=case.net, pattern=case.pattern,
                   sparsity=case.sparsity, batch=case.batch, dtype=case.dtype,
                   device=case.device.value, threads=case.threads, size=case.size,
                   plan=case.plan_file, source_hash=case.source_hash, status=res.status,
                   classifier=case.classifier,
                   reason=res.reason, rel_err=res.rel_err, replaced=res.replaced,
                   kept_dense=res.kept_dense, kernels=res.kernels, dense_s=dense_s, dense_layout=layout,
                   dense_nchw_s=res.dense_nchw_s, dense_cl_s=res.dense_cl_s,
                   dense_compiled_s=res.dense_compiled_s, sparse_s=res.sparse_s,
                   sparse_epilogue_s=res.sparse_epilogue_s,
                   sparse_unfused_s=res.sparse_unfused_s, sparse_whole_s=res.sparse_whole_s,
                   batch_chunk=res.batch_chunk, relu_fused=res.relu_fused,
                   handover=res.handover, residual=res.residual, conv_pool=res.conv_pool,
                   dense_ops=res.dense_ops,
                   in_network=res.in_network, outside_in_network=_outside(res.in_network),
                   sparse_first_s=res.sparse_first_s, sparse_repeated_s=res.sparse_repeated_s,
                   memory_wait=(1 - res.sparse_repeated_s / res.sparse_first_s
                                if res.sparse_first_s and res.sparse_repeated_s else None),
                   strided=res.strided,
                   speedup=dense_s / res.sparse_s if ok else None,
                   conv_dense_s=res.conv_dense_s, conv_sparse_s=res.conv_sparse_s,
                   estimate=res.conv_dense_s / res.conv_sparse_s
                   if ok and res.conv_dense_s and res.conv_sparse_s else None,
                   outside_share=1 - res.conv_sparse_s / res.sparse_s
                   if ok and res.conv_sparse_s else None,
                   dense_graph_s=res.dense_graph_s, sparse_graph_s=res.sparse_graph_s,
                   graph_speedup=res.dense_graph_s / res.sparse_graph_s
                   if ok and res.dense_graph_s and res.sparse_graph_s else None,
                   graph_note=res.graph_note,
                   noisy=res.noisy, samples=res.samples, node=node,
                   gpu_clocks=res.gpu_clocks, gpu_others=res.gpu_others, cudnn=case.cudnn,
                   engines=res.engines, contention=res.contention, retaken=res.retaken,
                   contended=res.contended, remeasured=res.remeasured,
                   implausible=res.implausible,
                   **(engine_summary(res.engines) if res.status is Status.OK else {}))

    def row(self) -> dict:
        return sql_row(self, ("noisy", "classifier", "contended"))
