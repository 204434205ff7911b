"""``python -m harness autotune``: the best kernel and configuration per layer, as a plan."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd

import kernels
import shapes
from kernels import patterns as P

from .. import UsageError, cases, drivers, env, execute, plan
from ..autotune import STRATEGIES
from ..autotune.tuner import RACE, TIMING, TuneJob, candidates
from ..records import Device
from ..store import Store
from .common import (
    DEFAULT_DB,
    add_executor,
    add_threads,
    device_of,
    machine_words,
    name_list,
    positive,
    prioritise,
    sparsity_list,
    threads_of,
)


def add_parser(sub):
    p = sub.add_parser("autotune", help="choose the fastest kernel and configuration per layer")
    p.add_argument("--net", default="resnet50", choices=shapes.NETS)
    p.add_argument("--layers", help="comma list of layer names (default: every unique shape)")
    p.add_argument("--patterns", default="cs", help="comma list of patterns to consider")
    p.add_argument("--sparsity", default="0.9375")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--interpret", action="store_true",
                   help="with --device cuda: Triton's interpreter on the CPU (pipeline check)")
    p.add_argument("--strategy", default="model", choices=list(STRATEGIES))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget", type=positive(int, 1),
                   help="evaluations per layer (default: 25%% of its space)")
    g.add_argument("--time-budget", type=positive(float, 0, strict=True),
                   help="seconds for the whole net")
    p.add_argument("--compare", default="",
                   help="also run these strategies (e.g. random,model) against exhaustive and "
                        "print the per-layer regret")
    p.add_argument("--batch", type=positive(int, 1), default=1)
    p.add_argument("--dtype", default="float32", choices=list(kernels.DTYPES))
    add_threads(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--db", default=str(DEFAULT_DB))
    p.add_argument("--out-dir", default="results/plans")
    add_executor(p)
    p.set_defaults(func=run)


def _layer_row(r):
    best_default = min(r.defaults.values(), default=math.inf)
    return {"layer": r.layer.name, "shape": r.layer.shape_str, "count": r.layer.count,
            "space": r.candidates, "evals": r.evaluations, "kernel": r.best.kernel,
            "config": dict(r.best.config), "tuned ms": r.best_s * 1e3,
            "default ms": best_default * 1e3 if math.isfinite(best_default) else None,
            "dense ms": r.dense_s * 1e3, "speedup": r.dense_s / r.best_s}


def run(args) -> int:
    (S,) = sparsity_list(args.sparsity) if "," not in args.sparsity else (None,)
    if S is None:
        raise UsageError("--sparsity takes one value; run autotune once per sparsity")
    pats = name_list(args.patterns, P.names(), "pattern")
    compare = name_list(args.compare, list(STRATEGIES), "strategy") if args.compare else []
    device = device_of(args)
    notes: list[str] = []
    try:
        layers = cases.select_layers([args.net], args.layers.split(",") if args.layers else None,
                                     notes=notes)
    except ValueError as e:
        raise UsageError(f"{args.net}: {e}") from None
    for note in notes:
        print(note)
    if not any(kernels.get(n).pattern in pats for n in kernels.names(device=device.kernel_device)):
        raise UsageError(f"no {args.device} kernel implements pattern(s) {', '.join(pats)}")
    none = [lay.name for lay in layers if not candidates(lay, pats, S, device, args.dtype)]
    if len(none) == len(layers):
        raise UsageError(f"no sparse candidate for any layer of {args.net} with "
                         f"{'+'.join(pats)} at S={S:g} (e.g. CS needs K=1/(1-S) to be a power "
                         f"of two: 0.5, 0.75, 0.875, 0.9375); nothing to tune")
    threads = threads_of(args)
    if args.executor == "ray":
        if compare:
            raise UsageError("--compare runs on this machine only; drop --executor ray")
        if args.time_budget is not None:
            raise UsageError("--time-budget is for a tuning on this machine; with --executor "
                             "ray give --budget (evaluations per layer)")
        execute.check(args.executor, args.ray_address)
    store = Store(args.db)
    fp = dict(env.fingerprint())
    priority = prioritise(fp, device)
    print(f"autotune {args.net} {'+'.join(pats)} S={S:g} on {machine_words(fp, device, threads)} "
          f"(device {device}, {args.dtype}), strategy {args.strategy}")
    if priority:
        print(priority)
    if none:
        print(f"  no sparse candidate (these stay dense): {', '.join(none)}")
    jobs = [TuneJob(layer=lay, patterns=tuple(pats), sparsity=S, batch=args.batch,
                    dtype=args.dtype, device=device, threads=threads, strategy=args.strategy,
                    budget=args.budget, seed=args.seed, compare=tuple(compare))
            for lay in layers]
    t0 = time.monotonic()
    with execute.make(args.executor, TIMING, 120.0, address=args.ray_address,
                      gpus=device is Device.CUDA) as ex:
        info, results, compare_rows, untuned = drivers.tune(
            ex, store, jobs, time_budget=args.time_budget, log=lambda t: print(t, flush=True))
    if untuned:
        print(f"autotune stopped (Ctrl-C): {untuned} of {len(layers)} layer(s) not tuned, so no "
              f"plan was written; the layers tuned are in the tuning records of {args.db} and "
              f"are not measured again by the next run")
        return 130
    return _finish(args, pats, S, device, threads, store,
                   (info.fingerprint, info.identity, results), compare_rows, t0)


def _finish(args, pats, S, device, threads, store, tuned_on, compare_rows, t0) -> int:
    """Print the per-layer table, write the plan, print the comparison."""
    fp, ident, results = tuned_on
    table = pd.DataFrame([_layer_row(r) for r in results])
    with pd.option_context("display.width", 220, "display.max_colwidth", 70,
                           "display.max_rows", None):
        print(table.round(3).to_string(index=False))
    dense = sum(r.layer.count * r.dense_s for r in results)
    tuned = sum(r.layer.count * r.best_s for r in results)
    default = sum(r.layer.count * min([r.dense_s, *r.defaults.values()]) for r in results)
    out = plan.Plan(
        net=args.net, pattern="+".join(pats), sparsity=S, device=device.value, batch=args.batch,
        dtype=args.dtype, threads=threads,
        strategy="exhaustive" if compare_rows else args.strategy, fingerprint=fp,
        identity=ident, machine_hash=env.machine_hash(fp), network_speedup=dense / tuned,
        default_network_speedup=dense / default,
        evaluations=int(sum(r.evaluations for r in results)),
        layers=tuple(plan.PlanLayer(
            layer=r.layer.name, index=r.layer.index, count=r.layer.count,
            shape=r.layer.shape_str, kernel=r.best.kernel,
            source_hash=kernels.get(r.best.kernel).source_hash(), config=dict(r.best.config),
            time_s=r.best_s, dense_s=r.dense_s, speedup=r.dense_s / r.best_s,
            default_time_s=min(r.defaults.values(), default=None)) for r in results))
    path = plan.save(out, Path(args.out_dir) / f"{args.net}_{'+'.join(pats)}_{S:g}_"
                                               f"{device}.json")
    print(f"\nnetwork speedup against dense: tuned {dense / tuned:.2f}x, kernels' default "
          f"configurations {dense / default:.2f}x; plan written to {path}")
    if compare_rows:
        cmp_ = pd.DataFrame(compare_rows)
        print("\nstrategy comparison: each strategy's confirmed pick raced (interleaved, "
              f"{RACE.rounds} rounds) against exhaustive's; regret = pick / exhaustive - 1")
        with pd.option_context("display.width", 250, "display.max_colwidth", 110):
            print(cmp_.drop(columns="pick").round(2).to_string(index=False))
        for name, g in cmp_.groupby("strategy"):
            print(f"  {name}: {(g['regret %'] <= 5).sum()} of {len(g)} layers within 5%, worst "
                  f"regret {g['regret %'].max():.1f}%, mean "
                  f"{g['regret %'].mean():.1f}%, evaluations {g.evals.sum()} of "
                  f"{g['exhaustive evals'].sum()} ({100 * g.evals.sum() / g['exhaustive evals'].sum():.0f}%)")
    print(f"autotune finished in {time.monotonic() - t0:.0f} s")
    return 0
