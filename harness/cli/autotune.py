"""``python -m harness autotune``: the best kernel and configuration per layer, as a plan."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd

import kernels
import shapes
from kernels import patterns as P

from .. import UsageError, cases, cluster, env, plan
from ..autotune import STRATEGIES
from ..autotune.tuner import RACE, Evaluator, candidates, tune_layer
from ..records import Status
from ..runner import Worker, init_kernels
from ..store import Store
from .common import (
    DEFAULT_DB,
    add_executor,
    add_threads,
    device_of,
    machine_words,
    name_list,
    positive,
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
        cluster.require_ray(args.ray_address)
    store = Store(args.db)
    fp = env.fingerprint()
    ident = env.identity_hash(fp)
    if args.executor == "ray":
        t0 = time.monotonic()
        tuned_on = cluster.tune(store, layers, pats, S, args.batch, args.dtype, device, threads,
                                args.strategy, args.budget, args.seed, address=args.ray_address)
        return _finish(args, pats, S, device, threads, store, tuned_on, [], t0)
    worker = Worker()
    states = init_kernels(worker, kernels.names(device=device.kernel_device), 1800)
    broken = {n: st for n, st in states.items() if st.status is Status.COMPILE_ERROR}
    for n, st in broken.items():
        print(f"warning: {n} is left out: {st.reason}")
    t0 = time.monotonic()
    results, compare_rows = [], []
    print(f"autotune {args.net} {'+'.join(pats)} S={S:g} on {machine_words(fp, device, threads)} "
          f"(device {device}, {args.dtype}), strategy {args.strategy}")
    if none:
        print(f"  no sparse candidate (these stay dense): {', '.join(none)}")
    try:
        for i, lay in enumerate(layers):
            deadline = None
            if args.time_budget:
                left = args.time_budget - (time.monotonic() - t0)
                deadline = time.monotonic() + max(0.0, left) / (len(layers) - i)
            ev = Evaluator(store, worker, ident, lay, S, args.batch, args.dtype, device, threads)
            base = "exhaustive" if compare else args.strategy
            r = tune_layer(ev, pats, base, args.budget, args.seed, deadline, skip=broken)
            results.append(r)
            row = _layer_row(r)
            print(f"  [{i + 1}/{len(layers)}] {lay.name:22s} {row['kernel']:14s} "
                  f"{row['speedup']:5.2f}x  evals {r.evaluations}/{r.candidates} "
                  f"(measured {r.measured}, raced {ev.raced})", flush=True)
            picks = {"exhaustive": r.best}
            evals = {}
            for name in compare:
                ev2 = Evaluator(store, worker, ident, lay, S, args.batch, args.dtype, device,
                                threads, log=lambda *_: None)
                r2 = tune_layer(ev2, pats, name, args.budget, args.seed, skip=broken)
                picks[name], evals[name] = r2.best, r2.evaluations
            if compare:  # regret from one interleaved race of the confirmed picks
                names = list(picks)
                times = dict(zip(names, ev.race([picks[n] for n in names])[0]))
                for name in compare:
                    compare_rows.append({
                        "layer": lay.name, "strategy": name, "evals": evals[name],
                        "exhaustive evals": r.evaluations,
                        "fraction": evals[name] / max(1, r.evaluations),
                        "pick": picks[name].label(),
                        "same pick": picks[name] == picks["exhaustive"],
                        "pick ms": times[name] * 1e3,
                        "exhaustive pick ms": times["exhaustive"] * 1e3,
                        "regret %": 100 * (times[name] / times["exhaustive"] - 1)})
    except BaseException:  # SIGTERM, Ctrl-C: the candidate in flight is abandoned
        worker.kill()
        raise
    finally:
        worker.close()
    return _finish(args, pats, S, device, threads, store, (fp, ident, results), compare_rows, t0)


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
