"""The lease's steps: each takes the lease, its ``Step`` and the ``time.monotonic`` by which it
must stop starting work, records its rows, and returns ``(status, note)``: ``ok``, or ``cut``
when its share of the time ran out first."""

from __future__ import annotations

import importlib.util
import json
import sys
import time

from .. import gpu
from ..records import (
    Device,
    E2ECase,
    E2EMeasurement,
    E2ERequest,
    E2EResult,
    Measurement,
    Status,
    StepStatus,
    TimingOptions,
)
from . import programme as P
from .processes import child_env, pytest_results, run_capped


def versions(lease, step, until):
    """Versions, clocks, other processes on the GPU, and the measured ceilings."""
    from . import ceilings

    fp = lease.fp
    keys = ("gpu", "gpu_driver", "gpu_count", "cuda", "cudnn", "torch", "triton", "numpy",
            "python", "project", "git_commit", "git_dirty", "kernel_isa", "cpu", "cores")
    rows = [{"kind": "version", "name": k, "status": StepStatus.OK.value, "detail": json.dumps(fp.get(k))}
            for k in keys]
    clocks = gpu.clocks()
    procs = gpu.processes()
    for k, v in (clocks or {}).items():
        rows.append({"kind": "clock", "name": k, "status": StepStatus.OK.value, "value": v,
                     "unit": "MHz" if k.endswith("mhz") else k.split("_")[-1]})
    others = gpu.others(procs)
    rows.append({"kind": "processes", "name": "other processes on the GPU",
                 "status": StepStatus.OK.value if procs is not None else "no NVML",
                 "value": None if others is None else len(others),
                 "detail": json.dumps(others)})
    lease.say(f"  {fp.get('gpu') or 'no GPU'}; driver {fp.get('gpu_driver')}, CUDA "
              f"{fp.get('cuda')}, cuDNN {fp.get('cudnn')}, torch {fp.get('torch')}, triton "
              f"{fp.get('triton')}, python {fp.get('python')}")
    lease.say("  clocks: " + (", ".join(f"{k} {v}" for k, v in clocks.items()) if clocks
                              else "no NVML (no driver here)")
              + (f"; other processes on the GPU: {others}" if others else ""))
    for c in ceilings.measure(lease.device.interpreted):
        rows.append({"kind": "ceiling", "name": c.name, "status": StepStatus.OK.value, "value": c.value,
                     "unit": c.unit, "detail": json.dumps({"how": c.how})})
        lease.say(f"  ceiling {c.name}: {c.value:.4g} {c.unit} ({c.how})")
    lease.rows(step, rows)
    return StepStatus.OK.value, f"{len(rows)} rows"


def tests(lease, step, until):
    """tests/test_kernels_triton.py compiled and run on the GPU, in parallel workers where
    pytest-xdist is installed (through the interpreter in the dry run)."""
    p = lease.prog
    cmd = [sys.executable, "-m", "pytest", "tests/test_kernels_triton.py", "-v", "-m",
           "not slow", "-p", "no:cacheprovider", "--timeout", "300", *p.tests]
    changes = {}
    if not p.interpreted:
        changes["SPARSECONV_TEST_DEVICE"] = "cuda"
        if importlib.util.find_spec("xdist") is not None:
            cmd += ["-n", str(min(lease.workers, 16))]
    if importlib.util.find_spec("pytest_timeout") is None:
        cmd = [a for a in cmd if a not in ("--timeout", "300")]
    lease.say("  " + " ".join(cmd[1:]))
    rc, text = run_capped(cmd, child_env(**changes), until, lease.work / "pytest.log")
    rows = pytest_results(text)
    lease.rows(step, rows)
    tail = [ln for ln in text.splitlines() if ln.strip()][-12:]
    lease.say("\n".join("  | " + ln for ln in tail))
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    note = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no test ran"
    if rc is None:
        return StepStatus.CUT.value, f"stopped at its time share: {note}"
    if rc != 0 or counts.get(StepStatus.FAILED.value) or counts.get("error"):
        return StepStatus.FAILED.value, f"pytest exit {rc}: {note}"
    return StepStatus.OK.value, note


def compile_all(lease, step, until):
    """Every planned launch compiled in parallel processes into the lease's Triton cache (the
    one every later step's worker reads), before anything is timed."""
    jobs = P.compile_jobs(lease.prog)
    planned = len(jobs)
    if lease.prog.interpreted:
        jobs = P.compile_sample(jobs)
    src, sink = lease.work / "compile-jobs.json", lease.work / "compile-rows.jsonl"
    src.write_text(json.dumps([j.to_json() for j in jobs]))
    sink.unlink(missing_ok=True)
    arch = lease._arch()
    cmd = [sys.executable, "-m", "harness.capture", "--arch", str(arch), "--jobs",
           str(max(1, min(lease.workers, len(jobs)))), "--in", str(src), "--out", str(sink)]
    if not lease.prog.interpreted:  # ptxas -v would build every kernel twice: the lease's
        cmd.append("--no-stats")    # minutes go to timing (verify --compile --stats has them)
    lease.say(f"  {len(jobs)} of {planned} planned launches for sm_{arch}, "
              f"{lease.workers} processes, cache {lease.triton_cache()}")
    # the interpreter has nothing to compile: the compile processes run without it
    rc, text = run_capped(cmd, child_env(TRITON_INTERPRET=None), until,
                          lease.work / "compile.log")
    got = [json.loads(line) for line in sink.read_text().splitlines()] if sink.exists() else []
    rows = [{"kind": "compile", "name": f"{r['kernel']} {r['layer']} b{r['batch']} "
                                         f"{r['dtype']}",
             "status": r["status"], "value": r.get("seconds"), "unit": "s",
             "detail": json.dumps(r, default=str)} for r in got]
    lease.rows(step, rows)
    bad = [r for r in got if r["status"] not in (Status.OK.value, Status.UNSUPPORTED.value)]
    for r in bad[:10]:
        lease.say(f"  {r['status']}: {r['kernel']} {r['layer']} {r['dtype']} {r['config']}: "
                  f"{r.get('reason')}")
    spilled = [r for r in got if r.get("spill_stores")]
    note = (f"{sum(r['status'] == Status.OK.value for r in got)} kernels built from "
            f"{len(jobs)} launches, {len(bad)} failed, {len(spilled)} spill")
    if rc is None:
        return StepStatus.CUT.value, f"stopped at its time share: {note}"
    if rc != 0:
        lease.say("\n".join("  | " + ln for ln in text.splitlines()[-15:]))
        return StepStatus.FAILED.value, f"capture exit {rc}: {note}"
    return (StepStatus.FAILED.value if bad else StepStatus.OK.value), note


def _runner(lease):
    from ..runner import CaseRunner

    if lease.runner is None:  # the interpreter's rounds check the pipeline: one is enough
        timing = TimingOptions(rounds=1 if lease.prog.interpreted else 25, min_sample=2e-3,
                               warmup=0.05)
        lease.runner = CaseRunner(timing, case_timeout=120.0, init_timeout=300.0)
    return lease.runner


def layers(lease, step, until):
    """The paper's layers, each case gated, then timed interleaved with cuDNN's faster
    layout; rows go to the measurements table as they finish."""
    cases = P.bench_cases(lease.prog)
    runner = _runner(lease)
    runner.prepare(cases)
    counts, left_out = {}, 0
    for case in cases:
        if time.monotonic() > until:
            left_out += 1
            continue
        runner.case_timeout = max(10.0, min(120.0, until - time.monotonic() + 30))
        res = runner.run(case)
        m = Measurement.of(case, res, lease.run_id, lease.ident, lease.fp_machine(),
                           node=lease.fp.get("hostname"))
        lease.store.add(m)
        counts[m.status.value] = counts.get(m.status.value, 0) + 1
        if m.status is Status.OK and m.dense_kernel_median_s and not case.is_dense:
            lease.say(f"  {case.layer.name} b{case.batch} {case.dtype} {case.kernel} "
                      f"S={case.sparsity:g}: {m.kernel_median_s * 1e6:.1f} us, "
                      f"{m.dense_kernel_median_s / m.kernel_median_s:.2f}x cuDNN "
                      f"({m.timing_mode})")
        elif m.status.failed:
            lease.say(f"  {m.status}: {case.layer.name} {case.kernel} {case.dtype} "
                      f"S={case.sparsity:g}: {m.reason}")
        lease.maybe_flush()
    note = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    if left_out:
        return StepStatus.CUT.value, f"{note}; {left_out} of {len(cases)} cases not run (time share spent)"
    return StepStatus.OK.value, note


def tune(lease, step, until):
    """Per kernel and layer: dense and the kernel's default, a seeded screen of
    configurations (the ones step 3 compiled), then the tuner's checked race."""
    from ..autotune.tuner import Evaluator, confirm

    p = lease.prog
    jobs = P.tune_jobs(p)
    runner = _runner(lease)
    runner.prepare([])
    cut = 0
    for i, job in enumerate(jobs):
        now = time.monotonic()
        if now > until:
            cut += 1
            continue
        job_until = now + (until - now) / (len(jobs) - i)
        ev = Evaluator(lease.store, runner.worker, lease.ident, job.layer, job.sparsity,
                       p.tune_batch, "float32", p.device, p.threads,
                       case_timeout=max(10.0, min(120.0, until - now)), log=lease.say)
        dense_s, layout = ev.dense()
        history = {}
        screen = job.screened(p)
        for cand in screen:
            if history and time.monotonic() > job_until:
                break
            history[cand] = ev.cost(cand)
        best, best_s = confirm(ev, history, dense_s, layout)
        speedup = dense_s / best_s if best_s and best_s == best_s and best_s < float("inf") \
            else None
        detail = {"layer": job.layer.name, "batch": p.tune_batch, "sparsity": job.sparsity,
                  "tuned": job.kernel, "kernel": best.kernel, "config": dict(best.config),
                  "best_s": best_s if best_s < float("inf") else None, "dense_s": dense_s,
                  "dense_layout": layout, "screened": len(history), "planned": len(screen),
                  "measured": ev.measured, "raced": ev.raced,
                  "note": None if len(history) == len(screen) else
                  f"screen cut at {len(history)} of {len(screen)}"}
        lease.rows(step, [{"kind": "tuned", "name": f"{job.kernel} {job.layer.name}",
                           "status": StepStatus.OK.value if speedup else StepStatus.FAILED.value, "value": speedup,
                           "unit": "x dense", "detail": json.dumps(detail, default=str)}])
        lease.say(f"  {job.kernel} {job.layer.name} S={job.sparsity:g}: {best.label()} "
                  + (f"{speedup:.2f}x dense" if speedup else "no time")
                  + f" (screened {len(history)} of {len(screen)}, raced {ev.raced})")
        lease.maybe_flush()
    if cut:
        return StepStatus.CUT.value, f"{len(jobs) - cut} of {len(jobs)} tuned (time share spent)"
    return StepStatus.OK.value, f"{len(jobs)} tuned"


def network(lease, step, until):
    """The network end to end, checked against the masked dense network, eager and (on a
    GPU) replayed from CUDA graphs, each figure beside the same run's dense baselines."""
    from ..e2e import source_hash

    p = lease.prog
    runner = _runner(lease)
    runner.prepare([])
    from ..runner import run_case

    opts = TimingOptions(rounds=1, min_sample=0.0, warmup=0.0) if p.interpreted else \
        TimingOptions(rounds=25, min_sample=2e-3)
    jobs = [(pattern, S, b) for pattern, S in p.e2e_patterns for b in p.e2e_batches]
    done = 0
    for pattern, S, batch in jobs:
        if time.monotonic() > until:
            continue
        case = E2ECase(net=p.e2e_net, pattern=pattern, sparsity=S, batch=batch,
                       dtype="float32", device=p.device, threads=p.threads, size=p.e2e_size,
                       source_hash=source_hash(pattern, p.device),
                       cudnn=gpu.cudnn_version() if p.device is Device.CUDA else None)
        res = run_case(runner.worker, E2ERequest(case, opts),
                       max(30.0, until - time.monotonic() + 60), result=E2EResult)
        m = E2EMeasurement.of(case, res, lease.run_id, lease.ident, lease.fp_machine(),
                              node=lease.fp.get("hostname"))
        lease.store.add_e2e(m)
        done += 1
        if m.status is Status.OK:
            lease.say(f"  {p.e2e_net} {pattern} {S:g} batch {batch}: dense {m.dense_s * 1e3:.2f}"
                      f" ms, sparse {m.sparse_s * 1e3:.2f} ms eager ({m.speedup:.2f}x)"
                      + (f"; CUDA graphs {m.dense_graph_s * 1e3:.2f} / "
                         f"{m.sparse_graph_s * 1e3:.2f} ms ({m.graph_speedup:.2f}x)"
                         if m.graph_speedup else f"; no graphs: {m.graph_note or 'interpreter'}"))
        else:
            lease.say(f"  {p.e2e_net} {pattern} batch {batch}: {m.status}: {m.reason}")
        lease.maybe_flush()
    if done < len(jobs):
        return StepStatus.CUT.value, f"{done} of {len(jobs)} networks (time share spent)"
    return StepStatus.OK.value, f"{done} networks"
