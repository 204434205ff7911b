"""``python -m harness e2e``: whole-network latency of sparse networks against dense."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

import shapes
from kernels import patterns as P

from .. import contention, drivers, engines, env, execute, gpu, plan
from ..e2e import source_hash as e2e_source_hash
from ..interrupts import by_sigterm
from ..records import (
    SPARSE_CONV,
    Device,
    E2ECase,
    E2ERequest,
    RunStatus,
    Status,
    TimingOptions,
    handover_saved_s,
    images_per_call,
    residual_fused,
)
from ..store import Store
from .common import (
    DEFAULT_DB,
    add_executor,
    add_threads,
    device_of,
    interval,
    interval_column,
    machine_words,
    name_list,
    positive,
    prioritise,
    sparsity_list,
    threads_of,
)

DEFAULT_PLANS = "results/plans"


def add_parser(sub):
    p = sub.add_parser("e2e", help="measure whole networks, sparse against dense, end to end")
    p.add_argument("--nets", default="resnet50", help=f"comma list of {', '.join(shapes.NETS)}")
    p.add_argument("--patterns", default="cs", help="comma list of patterns")
    p.add_argument("--sparsities", default="0.9375")
    p.add_argument("--batch", type=positive(int, 1), default=1)
    p.add_argument("--plans", default=DEFAULT_PLANS,
                   help="folder of autotuner plans (<net>_<pattern>_<S>_<device>.json); a "
                        "network without a matching plan uses each layer's default kernel")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--interpret", action="store_true",
                   help="with --device cuda: Triton's interpreter on the CPU at a 32x32 input "
                        "(a pipeline check, not a timing)")
    p.add_argument("--size", type=positive(int, 32), default=None,
                   help="input height and width (default 224; 32 under --interpret)")
    add_threads(p)
    p.add_argument("--rounds", type=positive(int, 1), default=7)
    p.add_argument("--min-sample", type=positive(float, 0), default=0.05,
                   help="seconds each variant runs per round, at least (default 0.05: shorter "
                        "blocks, right after another engine ran, are measured slower than the "
                        "same engine alone)")
    p.add_argument("--case-timeout", type=positive(float, 0, strict=True), default=3600.0)
    p.add_argument("--classifier", action="store_true",
                   help="sparsify the Linear classifier too (as the 1x1 convolution it is)")
    p.add_argument("--dense-compile", action="store_true",
                   help="also time a torch.compile'd dense model (slow to build; the same as "
                        "naming the engine torch_compile)")
    p.add_argument("--engines", default="all",
                   help="comma list of whole-network engines to time beside the sparse network "
                        "(CPU): 'all' (default) is every one of "
                        f"{', '.join(engines.names())} (one not installed is named and left "
                        "out); 'none': PyTorch eager only, which is always measured")
    p.add_argument("--no-alone", dest="alone", action="store_false",
                   help="skip timing each engine alone in a process of its own (the check of "
                        "the interleaved figures: where one differs by more than 10%%, every "
                        "engine reports its alone figure; it costs a process per engine, "
                        "prepared before the alone rounds)")
    p.add_argument("--fresh", action="store_true", help="measure networks already measured")
    p.add_argument("--db", default=str(DEFAULT_DB))
    add_executor(p)
    p.set_defaults(func=run)


ALWAYS = ("eager_nchw", "eager_channels_last")


def engine_list(text: str, device) -> list[str]:
    """The engines an e2e run times: PyTorch eager always; on the CPU the named ones ('all':
    every default engine registered, installed or not: the run says which it could not use)."""
    if device is not Device.CPU:  # the exported engines run on the CPU only
        return list(ALWAYS)
    if text.strip() == "none":
        return list(ALWAYS)
    chosen = engines.names() if text.strip() == "all" else name_list(
        text, engines.names(all_=True), "engine")
    return list(ALWAYS) + [n for n in chosen if n not in ALWAYS]


def choose_plan(folder: Path, net, pattern, S, batch, identity, device):
    """(plan or None, file name or None, what was decided in one sentence)."""
    path = folder / f"{net}_{pattern}_{S:g}_{device}.json"
    if not path.exists():
        return None, None, f"no plan at {path}: each layer's default kernel and configuration"
    try:
        p = plan.load(path)
        p.check(net, pattern, S, batch, identity, device)
    except plan.PlanError as e:
        return None, None, f"{path}: {e}; using default configurations instead"
    return p, path.name, f"plan {path}"


def _table(df: pd.DataFrame) -> pd.DataFrame:
    if (df.device == Device.CUDA_INTERPRET.value).any():  # a pipeline check: no speedups
        df = df.assign(speedup=None, estimate=None, outside_share=None,
                       outside_in_network=None)
    out = pd.DataFrame({
        "net": df.net, "pattern": df.pattern, "S": df.sparsity, "batch": df.batch,
        "plan": df.plan.fillna("defaults"),
        "classifier": df.classifier.map(lambda c: "sparse" if c == 1 else "dense"),
        "status": df.status,
        "best dense engine": df.best_dense_engine, "best dense ms": df.best_dense_s * 1e3,
        "sparse ms": df.sparse_latency_s * 1e3, "x best dense": df.speedup_best,
        "x best dense 95%": interval_column(df, "speedup_best"),
        "x eager": df.speedup_eager, "DeepSparse ms": df.deepsparse_s * 1e3,
        "DeepSparse / sparse": df.vs_deepsparse,
        "DeepSparse / sparse 95%": interval_column(df, "vs_deepsparse"),
        "interleaved eager ms": df.dense_s * 1e3, "eager layout": df.dense_layout,
        "interleaved sparse ms": df.sparse_s * 1e3, "interleaved x": df.speedup,
        "summed-conv x": df.estimate, "outside convs (summed)": df.outside_share,
        "outside convs (in network)": df.outside_in_network,
        "sparse convs waiting for memory": df.memory_wait,
        "sparse layers": df.replaced,
        "handover pairs": df.handover.map(lambda h: len(json.loads(h)) if isinstance(h, str)
                                          else None),
        "handover saves ms": df.handover.map(handover_saved_s) * 1e3,
        "residual adds fused": df.residual.map(lambda h: len(residual_fused(h))
                                               if isinstance(h, str) else None),
        "residual saves ms": df.residual.map(handover_saved_s) * 1e3,
        "epilogues save ms": (df.sparse_unfused_s - df.sparse_epilogue_s) * 1e3,
        "conv+pool pass saves ms": df.conv_pool.map(handover_saved_s) * 1e3,
        "images per call": df.batch_chunk.where(df.batch > 1).map(images_per_call),
        "images per call save ms": (df.sparse_whole_s - df.sparse_s) * 1e3})
    if "graph_speedup" in df and df.graph_speedup.notna().any():  # GPU runs: CUDA graphs too
        out["graph dense ms"] = df.dense_graph_s * 1e3
        out["graph sparse ms"] = df.sparse_graph_s * 1e3
        out["graph x"] = df.graph_speedup
    return out.round(3)


def run(args) -> int:
    t0 = time.time()
    nets = name_list(args.nets, shapes.NETS, "net")
    pats = name_list(args.patterns, P.names(), "pattern")
    sparsities = sparsity_list(args.sparsities)
    device = device_of(args)
    execute.check(args.executor, args.ray_address)
    size = args.size or (32 if device.interpreted else 224)
    threads = threads_of(args)
    opts = TimingOptions(rounds=1, min_sample=0.0, warmup=0.0) if device.interpreted else \
        TimingOptions(rounds=args.rounds, min_sample=args.min_sample)
    # before the run is recorded: from there on a signal must find it in the try below
    chosen = engine_list(args.engines, device)
    if args.dense_compile and "torch_compile" not in chosen:
        chosen.append("torch_compile")
    versions = engines.versions(tuple(chosen))
    busy = contention.busy_now() if not device.interpreted else None
    store = Store(args.db)
    fp = dict(env.fingerprint())
    fph, mh = env.identity_hash(fp), env.machine_hash(fp)
    priority = prioritise(fp, device)
    run_id = store.start_run(fp, fph, mh, {k: v for k, v in vars(args).items() if k != "func"})
    print(f"e2e: {len(nets) * len(pats) * len(sparsities)} network(s) on "
          f"{machine_words(fp, device, threads)}, batch {args.batch}, {size}x{size} input, "
          f"device {device}")
    if priority:
        print(priority)
    jobs = [(net, pattern, S) for net in nets for pattern in pats for S in sparsities]
    for name, v in versions.items():
        if v is None:
            print(f"  engine {name}: not measured: {engines.get(name).available()}")
    if busy:
        print(busy, flush=True)

    def make_request(job, identity):
        net, pattern, S = job
        p, pfile, said = choose_plan(Path(args.plans), net, pattern, S, args.batch, identity,
                                     device)
        case = E2ECase(net=net, pattern=pattern, sparsity=S, batch=args.batch, dtype="float32",
                       device=device, threads=threads, size=size,
                       plan=None if p is None else p.to_dict(), plan_file=pfile,
                       source_hash=e2e_source_hash(pattern, device),
                       classifier=args.classifier,
                       cudnn=gpu.cudnn_version() if device is Device.CUDA else None,
                       engines=json.dumps(versions, sort_keys=True))
        return E2ERequest(case, opts, args.dense_compile, alone=args.alone), said

    try:
        with execute.make(args.executor, TimingOptions(), args.case_timeout,
                          address=args.ray_address, gpus=device is Device.CUDA) as ex:
            keys, unrun = drivers.e2e(
                ex, store, run_id, jobs, make_request, timeout=args.case_timeout,
                fresh=args.fresh, log=lambda t: print(t, flush=True), on_result=show,
                label=lambda j: f"{j[0]} {j[1]} S={j[2]:g}")
        store.finish_run(run_id, RunStatus.STOPPED if unrun else RunStatus.FINISHED)
    except KeyboardInterrupt as e:  # SIGTERM: stopped; Ctrl-C: aborted
        store.finish_run(run_id, RunStatus.STOPPED if by_sigterm(e) else RunStatus.ABORTED)
        raise
    except BaseException:
        store.finish_run(run_id, RunStatus.FAILED)
        raise
    df = store.e2e(None if args.executor == "ray" else fph)
    df = df[df.case_key.isin(keys)]
    with pd.option_context("display.width", 220, "display.max_rows", None):
        print("\nWhole networks (measured end to end; x best dense: against the fastest dense "
              "engine of the same run; x eager: against PyTorch eager, the faster layout; "
              "DeepSparse / sparse above 1: this project is faster on the same masks; "
              "summed-conv x: per-layer convolution times summed, same run):"
              if not device.interpreted else "\nWhole networks through Triton's interpreter "
              "(a pipeline check: the gate ran, the times are not GPU timings):")
        print(_table(df).to_string(index=False))
    kept = {r.net: json.loads(r.kept_dense) for r in df.itertuples()  # (a failed case: none)
            if isinstance(r.kept_dense, str)}
    for net, why in kept.items():
        if why:
            print(f"  {net}: {len(why)} layer(s) stay dense, e.g. "
                  f"{next(iter(why))}: {next(iter(why.values()))}")
    if unrun:
        print(f"e2e stopped (Ctrl-C) after {time.time() - t0:.0f} s: {unrun} network(s) not "
              f"measured; run the same command again to measure them; results in {args.db}")
        return 130
    print(f"e2e finished in {time.time() - t0:.0f} s; results in {args.db}")
    return 0



def show(m) -> None:
    """What one whole-network measurement found, as it is stored."""
    if m.status is not Status.OK:
        print(f"    {m.status}: {m.reason}", flush=True)
        return
    print_engines(m)
    print(f"    interleaved in one process: eager {m.dense_s * 1e3:.2f} ms "
          f"({m.dense_layout}), sparse {m.sparse_s * 1e3:.2f} ms: {m.speedup:.2f}x; "
          f"{m.estimate:.2f}x summed convolutions", flush=True)
    if m.graph_speedup is not None:
        print(f"    as CUDA graphs (no launch overhead): dense {m.dense_graph_s * 1e3:.2f} ms, "
              f"sparse {m.sparse_graph_s * 1e3:.2f} ms: {m.graph_speedup:.2f}x", flush=True)
    elif m.graph_note:
        print(f"    no CUDA graph: {m.graph_note}", flush=True)
    if m.sparse_epilogue_s is not None and m.sparse_unfused_s is not None:
        pairs = json.loads(m.handover)
        saved = handover_saved_s(m.handover)
        ends = residual_fused(m.residual)
        apart = len(json.loads(m.residual or "[]")) - len(ends)
        print(f"    fused: {m.relu_fused} ReLU(s), {len(ends)} residual addition(s) and every "
              f"bias in the kernels save "
              f"{(m.sparse_unfused_s - m.sparse_epilogue_s) * 1e3:.2f} ms (whole network); "
              f"{len(pairs)} layer pair(s) hand over in the kernel's layout"
              + (f", saving {saved * 1e3:.2f} ms summed over the pairs (each timed on its own)"
                 if saved is not None else ""), flush=True)
        for a, b, *t in pairs[:4]:
            print(f"      {a} -> {b}" + (f": {t[0] * 1e6:.0f} us" if t else ""))
        if len(pairs) > 4:
            print(f"      ... {len(pairs) - 4} more (the e2e table's handover column)")
        saved = handover_saved_s(m.residual)
        if saved is not None:
            print(f"    the residual additions and their ReLUs in the kernels save "
                  f"{saved * 1e3:.2f} ms summed over the {len(ends)} block ends (each timed on "
                  f"its own; part of the epilogues' figure)"
                  + (f"; {apart} block end(s) add it after the kernel (measured faster so)"
                     if apart else ""), flush=True)
    for name, saved in json.loads(m.conv_pool or "[]"):
        print(f"    {name}, a convolution kept dense, runs with its ReLU and max-pool as one pass: "
              f"{saved * 1e3:.2f} ms saved against the three operations (timed on its own, "
              f"on the whole batch)",
              flush=True)
    for pair, said in json.loads(m.strided or "{}").items():
        print(f"    into a stride-2 layer, {pair}: {said}", flush=True)
    where = json.loads(m.in_network) if isinstance(m.in_network, str) else None
    if where:
        conv = where.get(SPARSE_CONV, 0.0)
        rest = sorted(((t, k) for k, t in where.items() if k != SPARSE_CONV), reverse=True)
        print(f"    inside the network, node by node: {SPARSE_CONV} {conv * 1e3:.2f} ms, "
              f"{m.outside_in_network:.0%} outside them: "
              + ", ".join(f"{k} {t * 1e3:.2f} ms" for t, k in rest[:6])
              + (f" (the summed-convolution figure puts {m.outside_share:.0%} outside: each "
                 f"layer timed alone runs from warm caches)" if m.outside_share is not None
                 else ""), flush=True)
        if m.memory_wait is not None:
            print(f"    the {SPARSE_CONV}, each called again at once in the network (its data "
                  f"now in the caches): {m.sparse_repeated_s * 1e3:.2f} ms against "
                  f"{m.sparse_first_s * 1e3:.2f} ms where they run"
                  + (f": at most {m.memory_wait:.0%} of their time in the network is waiting "
                     f"for data the other layers pushed out of the caches" if m.memory_wait > 0
                     else ": the repeats were no faster, no wait for memory measured"),
                  flush=True)
    if m.batch_chunk and m.batch > 1:
        print(f"    batch: {m.batch_chunk}"
              + (f"; the whole batch in one call, same run: {m.sparse_whole_s * 1e3:.2f} ms "
                 f"against {m.sparse_s * 1e3:.2f} ms" if m.sparse_whole_s else ""), flush=True)
    if m.dense_ops:
        print(f"    dense operations (convolutions kept dense, max-pools; Linear layers left "
              f"dense) in {m.dense_ops}",
              flush=True)


def _x(v) -> str:
    return "-" if v is None or v != v else f"{v:.2f}x"


def print_engines(m) -> None:
    """Every engine's latency, then the headline: against the best dense engine measured in
    this run (naming it and those it was the best of), against eager, and DeepSparse."""
    rows = json.loads(m.engines) if m.engines else []
    for r in rows:
        if r["status"] == Status.OK.value and r.get("latency_s"):
            alone = (f", alone {r['alone_s'] * 1e3:.2f} ms" if r.get("alone_s") else "")
            print(f"    {r['variant']:<28} {r['latency_s'] * 1e3:9.2f} ms  (interleaved "
                  f"{r['interleaved_s'] * 1e3:.2f} ms{alone}; CPU/wall "
                  f"{r.get('cpu_per_wall') or 0:.2f})" + (f"  {r['alone_note']}"
                                                          if r.get("alone_note") else ""))
        else:
            print(f"    {r['variant']:<28} {r['status']}: {r.get('reason')}")
    if m.speedup_best is not None:
        def ci(col):  # the interleaved rounds' 95% interval, where there are enough rounds
            text = interval(getattr(m, f"{col}_lo"), getattr(m, f"{col}_hi"))
            return f" [{text}]" if text != "-" else ""

        print(f"    sparse {m.sparse_latency_s * 1e3:.2f} ms: {_x(m.speedup_best)}"
              f"{ci('speedup_best')} against the best dense engine ({m.best_dense_engine}, "
              f"{m.best_dense_s * 1e3:.2f} ms; best of {m.dense_engines}), "
              f"{_x(m.speedup_eager)}{ci('speedup_eager')} against PyTorch eager, "
              + (f"{_x(m.vs_deepsparse)}{ci('vs_deepsparse')} DeepSparse's time on the same "
                 "masks" if m.vs_deepsparse is not None else "DeepSparse not measured")
              + (" (in brackets: 95% intervals from the interleaved rounds)"
                 if ci("speedup_best") else ""), flush=True)
