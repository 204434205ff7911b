"""Whole-network latency, measured: a catalogued network made sparse with ``sparsify`` is
checked against the masked dense network (same masks, float64) and then timed interleaved with
its dense baselines (BN folded; eager NCHW and eager channels_last, optionally a
``torch.compile``d model), and with two variants of itself on the same prepared kernels: epilogues
fused but NCHW between layers, and nothing fused, so the time the layout handover and the fused
epilogues save is measured, not assumed. In the same run every distinct convolution is timed on its own,
sparse and dense, so the summed-convolution estimate the papers report sits beside the measured
figure. Runs inside the runner's worker process (``E2ERequest`` -> ``E2EResult``)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

import kernels

from . import gate, gpu, sparse_model, timing
from .errors import error_text, status_of
from .measure import PLAUSIBLE
from .records import SPARSE_CONV, Device, E2ERequest, E2EResult, EngineResult, Status
from .timing import gpu_settings, ratio_interval, timed


@functools.cache  # pure per process: asked for every network and retry
def source_hash(pattern: str, device) -> str:
    """Every kernel the network may run (the pattern's, and the dense ones), and the code that
    builds and fuses the sparse network and measures it: part of an e2e case's key."""
    h = hashlib.sha256()
    for name in kernels.names(device=device.kernel_device):
        k = kernels.get(name)
        if k.pattern in (pattern, "dense"):
            h.update(f"{name}:{k.source_hash()};".encode())
    here = Path(__file__).resolve().parent
    for f in ("sparse_model.py", "e2e.py", "gate.py", *sorted(
            str(p.relative_to(here)) for p in (here / "engines").glob("*.py"))):
        h.update((here / f).read_bytes())
    return h.hexdigest()[:16]


def _input(batch: int, size: int, device: str):
    g = torch.Generator().manual_seed(1234)
    return (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)


_WRAPS = (sparse_model.ChannelsLastConv2d, sparse_model.ConvPool)  # a dense conv inside


def _conv_inputs(model: nn.Module, x) -> dict:
    """Module name -> the input it received, for every convolution (dense or sparse; a
    ``ConvPool`` is its convolution's name, under which it runs)."""
    wrapped = {n for n, m in model.named_modules() if isinstance(m, _WRAPS)}
    return sparse_model.inputs_of(model, [
        n for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, sparse_model.SparseConv2d, *_WRAPS))
        and n.rpartition(".")[0] not in wrapped], x)


def _conv_sums(dense: nn.Module, sparse: nn.Module, x, device, opts) -> tuple[float, float]:
    """(summed dense conv time, summed sparse conv time): each distinct convolution timed on
    its real input, dense (the faster of NCHW and channels_last) interleaved with the module
    the sparse network runs there, weighted by how often the shape occurs."""
    d_in, s_in = _conv_inputs(dense, x), _conv_inputs(sparse, x)
    groups: dict = {}
    for name, xin in d_in.items():
        conv = dense.get_submodule(name)
        key = (tuple(xin.shape), conv.in_channels, conv.out_channels, conv.kernel_size,
               conv.stride, conv.padding, conv.groups)
        groups.setdefault(key, []).append(name)
    total_d = total_s = 0.0
    for names in groups.values():
        name = names[0]
        conv, xin = dense.get_submodule(name), d_in[name]
        conv_cl = _channels_last(conv)
        xin_cl = xin.contiguous(memory_format=torch.channels_last)
        smod = sparse.get_submodule(name)
        if isinstance(smod, sparse_model.ConvPool):  # its convolution, as the layer the sum counts
            smod = smod.conv
        variants = {"nchw": (conv, xin), "cl": (lambda t, c=conv_cl: c(t), xin_cl),
                    "sparse": (smod, s_in[name])}
        with torch.inference_mode():
            st, _ = timed(device, variants, opts, graphs=False)  # eager, like the network's
        total_d += len(names) * min(st["nchw"].median, st["cl"].median)
        # a network running its batch a few images per call (BatchChunks) calls it that often
        total_s += len(names) * st["sparse"].median * len(x) / len(s_in[name])
    return total_d, total_s


def _handover_savings(epilogue: nn.Module, fused: nn.Module, x, device, opts) -> list:
    """[producer, consumer, seconds saved] per layer pair handing over in the kernel's layout:
    the pair run as in the epilogue-only network (NCHW between, the consumer converts) timed
    interleaved with the pair as in the fused network, on the producer's real input. The
    whole-network difference is a few percent of a noisy total; per pair it is measured."""
    ins = _conv_inputs(epilogue, x)
    out = []
    for a, b in fused.sparsify_report.handover:
        ea, eb = epilogue.get_submodule(a), epilogue.get_submodule(b)
        fa, fb = fused.get_submodule(a), fused.get_submodule(b)
        xa = ins[a]
        xf = fa.in_layout.layout(xa) if fa.laid_in else xa
        variants = {"convert": (lambda t, p=ea, q=eb: q(p(t)), xa),
                    "handover": (lambda t, p=fa, q=fb: q(p(t)), xf)}
        st, _ = timed(device, variants, opts, graphs=False)  # eager, like the network's
        out.append([a, b, st["convert"].median - st["handover"].median])
    return out


def _conv_pool_savings(fused: nn.Module, x, device, opts) -> list:
    """[layer, seconds saved] per dense convolution run with its ReLU and max-pool as one pass
    (``sparse_model.ConvPool``): the three operations as the network runs them otherwise
    (channels_last) timed interleaved with the one pass, on the layer's real input."""
    out = []
    for name, variants in sparse_model.conv_pool_variants(fused, x).items():
        st, _ = timed(device, variants, opts, graphs=False)  # eager, like the network's
        out.append([name, st["apart"].median - st["one"].median])
    return out


def _residual_savings(fused: nn.Module, x, device, opts) -> list:
    """[layer, seconds saved] per sparse layer that ends a residual block with the shortcut
    addition (and its ReLU) in its epilogue: the layer as the unfused network runs it (the
    kernel's output, then the addition and ReLU; ``sparse_model.residual_variants``) timed
    interleaved with the fused layer, on the layer's real input and shortcut."""
    out = []
    for name, variants in sparse_model.residual_variants(fused, x).items():
        st, _ = timed(device, variants, opts, graphs=False)  # eager, like the network's
        out.append([name, st["apart"].median - st["fused"].median])
    return out


def _kind(node, mods: dict) -> str:
    """What a graph node runs, for the in-network breakdown: a sparse convolution, or the
    operation's name (a module's class, a function's or method's name)."""
    m = mods.get(node.target) if node.op == "call_module" else None
    if isinstance(m, sparse_model.SparseConv2d) and not isinstance(m, sparse_model.SparseLinear):
        return SPARSE_CONV
    if isinstance(m, sparse_model.ConvPool):
        return f"{type(m.conv.conv).__name__}{'+ReLU' if m.relu else ''}+" \
               f"{type(m.pool.pool).__name__} (one pass)"
    if m is not None:
        inner = getattr(m, "conv", None) or getattr(m, "pool", None)
        return type(inner if inner is not None else m).__name__
    return getattr(node.target, "__name__", str(node.target))



def in_network(net: nn.Module, x, runs: int = 5) -> tuple[dict, tuple | None] | None:
    """Where the deployed network's time goes, measured inside it: the network run node by
    node (``torch.fx``), each operation timed where it runs, with the caches as the network
    leaves them (a layer timed alone, on its own input again and again, runs from warm caches;
    the summed-convolution estimate uses those). Returns ({kind: seconds per run}, summed over
    the nodes of each kind (``SPARSE_CONV``, ``Conv2d`` for one kept dense, ``add``, ``ReLU``,
    ``MaxPool2d``, ...), each kind's median over ``runs`` runs after one untimed (taken per
    kind, so the kinds' sum is not one run's total: fine for shares); and, from runs of their
    own (so the first figures meet no extra calls), (the sparse convolutions' seconds per run
    where they run, the same calls made again right after each, on the same inputs, their
    data now in the caches), the second of two calls timed, so its output is written where
    the first one's was: what they cost in the network beyond that is at most the wait for
    data the network pushed out of the caches), or None without sparse convolutions); None
    where the network is not a traceable graph. A network running its batch a few images per
    call (``sparse_model.BatchChunks``) is run so here too, and each run sums its calls."""
    import time
    from collections import defaultdict

    from torch import fx

    if not isinstance(net, fx.GraphModule):
        return None
    mods = dict(net.named_modules())
    kinds = {n: _kind(n, mods) for n in net.graph.nodes if n.op not in ("placeholder", "output")}
    acc: dict = defaultdict(float)
    repeat = False
    parts = net.parts(x) if isinstance(net, sparse_model.BatchChunks) else (x,)

    class Timed(fx.Interpreter):
        def run_node(self, n):
            if n not in kinds or (repeat and kinds[n] != SPARSE_CONV):
                return super().run_node(n)
            t = time.perf_counter()
            out = super().run_node(n)
            acc[kinds[n]] += time.perf_counter() - t
            if repeat:  # the same call at once, twice: the second is timed
                super().run_node(n)  # (its output reuses the memory the first one's freed)
                t = time.perf_counter()
                super().run_node(n)
                acc[REPEATED] += time.perf_counter() - t
            return out

    def medians():
        per_run = []
        with torch.inference_mode():
            for i in range(runs + 1):
                acc.clear()
                for part in parts:
                    Timed(net).run(part)
                if i:
                    per_run.append(dict(acc))
        return {k: sorted(r.get(k, 0.0) for r in per_run)[len(per_run) // 2]
                for k in per_run[0]}

    where = medians()
    if SPARSE_CONV not in where:
        return where, None
    repeat = True
    both = medians()
    return where, (both[SPARSE_CONV], both[REPEATED])


REPEATED = object()  # in_network's key for the sparse convolutions' repeated calls


def _channels_last(m: nn.Module) -> nn.Module:
    return copy.deepcopy(m).to(memory_format=torch.channels_last)


def _graph_variants(variants: dict, x, tol: float) -> tuple[dict, str | None]:
    """GPU: the dense layouts and the deployed sparse network as CUDA graphs, so launch
    overhead (large for Triton's Python launcher at batch 1) stays out of the comparison."""
    out = {}
    for name in ("dense_nchw", "dense_cl", "sparse"):
        fn, arg = variants[name]
        try:
            out[f"{name}_graph"] = (timing.checked_graph(fn, arg, fn(arg).clone(), tol), arg)
        except Exception as e:  # noqa: BLE001 - the eager figures still stand
            return {}, f"{name}: {error_text(e)}"
    return out, None


# before each variant's block of a round: an untimed pause, so the previous engine's threads
# go idle, and one untimed call. Measured (ResNet18, 2 threads): blocks of one call right after
# another engine ran came out 15-60% slower than the same engine alone in its own process;
# blocks of at least 50 ms (``e2e --min-sample``) after one untimed call agree with it
ENGINE_GAP = 0.02


def _implausible(st: dict, sparsity: float) -> str | None:
    """Why a network's timing cannot be taken at face value: the project's sparse network
    faster than the faster eager dense layout by more than ``measure.PLAUSIBLE`` times the
    FLOP ideal 1/(1-S) (only convolutions skip zeros, so a whole network stays below it)."""
    dense = [st[k].median for k in ("dense_nchw", "dense_cl") if k in st]
    if not dense or "sparse" not in st or sparsity >= 1:
        return None
    ratio, ideal = min(dense) / st["sparse"].median, 1 / (1 - sparsity)
    if ratio <= PLAUSIBLE * ideal:
        return None
    return (f"{ratio:.2f}x against eager dense is above the FLOP ideal {ideal:.2f}x after a "
            f"re-measurement")


def _prepare_engines(names, nets: dict, x, wants: dict, threads: int, tol: float):
    """Each engine on each network it runs (``engines.variants``): prepared (outside any
    timing), its output gated against the float64 reference of that network, and only then
    kept for timing. Returns ({variant: (fn, x)} to time, {variant: EngineResult})."""
    from . import engines

    timed_, rows = {}, {}
    for v in engines.variants(list(names)):
        e = engines.get(v.engine)
        role = "dense" if v.network == engines.DENSE else e.masked
        base = dict(variant=v.name, engine=v.engine, network=v.network, role=role,
                    label=e.label)
        why = e.available()
        if why:
            rows[v.name] = EngineResult(status=Status.UNSUPPORTED.value, reason=why, **base)
            continue
        base.update(version=e.version(), settings=e.settings(threads))
        try:
            fn = e.prepare(nets[v.network], x, threads)
            with torch.inference_mode():
                got = fn(x)
        except Exception as exc:  # noqa: BLE001 - one engine's failure is its row's status
            rows[v.name] = EngineResult(status=status_of(exc).value,
                                        reason=f"prepare/run: {error_text(exc)}", **base)
            continue
        err = gate.relative_error(got.cpu(), wants[v.network])
        if not err <= tol:
            rows[v.name] = EngineResult(
                status=Status.INCORRECT.value, rel_err=err, reason=(
                    f"output relative error {err:.3g} exceeds {tol:g} against the {v.network} "
                    f"network in float64"), **base)
            continue
        rows[v.name] = EngineResult(status=Status.OK.value, rel_err=err, **base)
        timed_[v.name] = (fn, x)
    return timed_, rows


def run_e2e(req: E2ERequest) -> E2EResult:
    """One network, measured (see the module docstring); the engines' exported files are
    removed at its end."""
    from .engines import _onnx

    try:
        return _run_e2e(req)
    finally:
        _onnx.cleanup()


def _run_e2e(req: E2ERequest) -> E2EResult:
    case, opts = req.case, req.timing
    torch.set_num_threads(case.threads)
    gpu_settings(case.device)
    dev = case.device.tensor_device
    try:
        model, unfused, sparse = sparse_model.build_case(case)
    except sparse_model.SparsifyError as e:
        return E2EResult(Status.UNSUPPORTED, str(e))
    except Exception as e:  # noqa: BLE001 - a kernel that cannot be prepared
        return E2EResult(status_of(e), "sparsify: " + error_text(e))
    size = (3, case.size, case.size)
    # the network as deployed (epilogues fused, layout handover) and, to measure what each
    # step saves, the same prepared kernels with epilogues only and with nothing fused
    rep = sparse.sparsify_report
    variants_sparse = {"sparse": sparse}
    if sparse is not unfused:
        # the whole batch per call, as the unfused network runs it, so the difference is the
        # epilogues' alone; what running a few images per call saves is its own variant
        # (and its dense convolution, ReLU and max-pool apart: that pass has its own figure)
        variants_sparse["sparse_epilogue"] = sparse_model.fuse_layers(
            unfused, handover=False, batch_chunk=0, conv_pool=False)
        variants_sparse["sparse_unfused"] = unfused
        if getattr(sparse, "batch_chunk", 0):
            variants_sparse["sparse_whole"] = sparse_model.fuse_layers(unfused, batch_chunk=0)
    used: dict = {}
    for r in rep.replaced.values():
        used[r["kernel"]] = used.get(r["kernel"], 0) + 1
    info = {"replaced": len(rep.replaced), "kept_dense": json.dumps(rep.dense, sort_keys=True),
            "kernels": json.dumps(used, sort_keys=True), "relu_fused": len(rep.relu_fused),
            "handover": json.dumps(rep.handover), "dense_ops": rep.dense_ops(),
            "residual": json.dumps([[n] for n in rep.residual_fused] + [
                [n, rep.residual[n]] for n in rep.residual_apart]),
            "strided": json.dumps(rep.strided, sort_keys=True), "batch_chunk": rep.batch_chunks}
    if not rep.replaced:
        return E2EResult(Status.UNSUPPORTED, f"{case.pattern} replaces no convolution of "
                                             f"{case.net}", **info)
    dense, _, _ = sparse_model.dense_folded(model, size)
    dense = dense.to(dev)
    masked = sparse_model.masked_dense(unfused)
    x = _input(case.batch, case.size, dev)
    tol = gate.TOLERANCE[case.dtype]
    with torch.inference_mode():
        want = copy.deepcopy(masked).double()(x.double().cpu())
        want_dense = copy.deepcopy(dense).cpu().double()(x.double().cpu())
        checked = gate.check_network(variants_sparse, x, want, tol)  # every variant timed
    if checked.error is not None:
        return E2EResult(status_of(checked.error), f"run ({checked.failed}): {checked.reason}",
                         **info)
    if checked.reason:
        return E2EResult(Status.INCORRECT, checked.reason, rel_err=checked.rel_err, **info)
    err = checked.rel_err
    names = case.engine_names() or ["eager_nchw", "eager_channels_last"]
    if req.dense_compile and "torch_compile" not in names:
        names.append("torch_compile")
    engine_fns, engine_rows = _prepare_engines(
        names, {"dense": dense, "masked": masked.to(dev)}, x,
        {"dense": want_dense, "masked": want}, case.threads, tol)
    variants = {**engine_fns, **{name: (net, x) for name, net in variants_sparse.items()}}
    # the names the GPU path and the old columns know the eager layouts by
    alias = {"eager_nchw@dense": "dense_nchw", "eager_channels_last@dense": "dense_cl",
             "torch_compile@dense": "dense_compiled"}
    variants = {alias.get(k, k): v for k, v in variants.items()}
    graph_note = None
    if case.device is Device.CUDA:
        with torch.inference_mode():
            graphs, graph_note = _graph_variants(variants, x, tol)
        variants.update(graphs)
    watch = gpu.Watch() if case.device is Device.CUDA else None  # clocks, other processes
    with torch.inference_mode():
        # eager as deployed; the *_graph variants are the CUDA-graph figures
        timing_ = timed(case.device, variants, opts, graphs=False,
                        gap=ENGINE_GAP)
        remeasured, why = 0, _implausible(timing_.stats, case.sparsity)
        if why:  # above what skipping the zeros can give: timed once more before belief
            timing_, remeasured = timed(case.device, variants, opts, graphs=False,
                                        gap=ENGINE_GAP), 1
            why = _implausible(timing_.stats, case.sparsity)
        st, samples = timing_
        # single layers and layer pairs: short calls, no other engine between them
        short = dataclasses.replace(opts, min_sample=min(opts.min_sample, 2e-3))
        conv_d, conv_s = _conv_sums(dense, sparse, x, case.device, short)
        if "sparse_epilogue" in variants_sparse and rep.handover:
            info["handover"] = json.dumps(_handover_savings(
                variants_sparse["sparse_epilogue"], sparse, x, case.device, short))
        if rep.conv_pool:  # on the whole batch, as the residual figure
            info["conv_pool"] = json.dumps(_conv_pool_savings(
                variants_sparse.get("sparse_whole", sparse), x, case.device, short))
        if case.device is Device.CPU:
            where = in_network(sparse, x)
            if where is not None:
                info["in_network"] = json.dumps(where[0], sort_keys=True)
                if where[1] is not None:
                    info["sparse_first_s"], info["sparse_repeated_s"] = where[1]
        if rep.residual_fused:
            # on the whole batch, as the epilogues' figure it is part of
            info["residual"] = json.dumps(
                _residual_savings(variants_sparse.get("sparse_whole", sparse), x, case.device,
                                  short)
                + [[n, rep.residual[n]] for n in rep.residual_apart])
    cpu = timing_.cpu_per_wall or {}
    rows = {}
    for name, row in engine_rows.items():
        k = alias.get(name, name)
        if k in st:
            lo, hi = ratio_interval(samples.get(k), samples.get("sparse"))
            row = dataclasses.replace(row, interleaved_s=st[k].median, latency_s=st[k].median,
                                      noisy=st[k].noisy, cpu_per_wall=cpu.get(k),
                                      vs_project_lo=lo, vs_project_hi=hi)
        rows[name] = row
    rows["project@sparse"] = EngineResult(
        variant="project@sparse", engine="project", network="sparse", role="project",
        label=f"this project ({case.pattern}, fused)", status=Status.OK.value, rel_err=err,
        interleaved_s=st["sparse"].median, latency_s=st["sparse"].median,
        noisy=st["sparse"].noisy, cpu_per_wall=cpu.get("sparse"))
    if req.alone and case.device is Device.CPU:
        import gc

        from .engines import alone

        # the engines timed here are not needed again: their memory goes to the alone processes
        # (VGG19's engines held ~10 GB here; with the alone processes beside them, the kernel
        # killed this process on a 24 GB machine)
        engine_fns.clear()
        variants.clear()
        gc.collect()
        rows = alone.check(case, rows, {"dense": dense, "masked": masked}, x, opts,
                           gap=ENGINE_GAP, decisions=rep.decisions())

    def med(name):
        return st[name].median if name in st else None

    return E2EResult(
        Status.OK, None, rel_err=err, dense_nchw_s=med("dense_nchw"),
        dense_cl_s=med("dense_cl"), dense_compiled_s=med("dense_compiled"),
        sparse_s=st["sparse"].median,
        sparse_epilogue_s=med("sparse_epilogue"), sparse_unfused_s=med("sparse_unfused"),
        sparse_whole_s=med("sparse_whole"), conv_dense_s=conv_d, conv_sparse_s=conv_s,
        dense_graph_s=min(st["dense_nchw_graph"].median, st["dense_cl_graph"].median)
        if "sparse_graph" in st else None,
        sparse_graph_s=st["sparse_graph"].median if "sparse_graph" in st else None,
        graph_note=graph_note,
        noisy=any(s.noisy for s in st.values()), samples=json.dumps(samples),
        engines=json.dumps([dataclasses.asdict(r) for r in rows.values()]),
        **({"contention": seen.share, "retaken": seen.retaken, "contended": seen.contended}
           if (seen := timing_.contention) else {}), remeasured=remeasured, implausible=why,
        **(watch.finish() if watch else {}), **info)
