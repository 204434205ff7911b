"""One command for a short lease on a bare GPU machine: the whole GPU programme within a
deadline, everything it measured in one output folder after every step.

``python -m harness lease --out DIR --deadline 450`` prints its plan and time budget, then runs
in order, skipping with one line any step that would overrun the deadline:

1. versions, GPU clocks, and measured ceilings (memory bandwidth, fp32 FMA rate, matrix rates);
2. the Triton tests compiled and run on the GPU, in parallel workers (pytest-xdist);
3. every planned kernel launch compiled in parallel into one Triton cache (``harness.capture``),
   before any timing;
4. the CS paper's three ResNet50 layers with the CS, OVW and 1xN kernels at 90% and 93.75%,
   batch 1 and 64, fp32 (TF32 off) and fp16, against cuDNN NCHW and NHWC, the Triton dense
   control and cuDNN with TF32 on (``harness.lease.programme``);
5. a budgeted batch-64 tuning of ``cs_triton_direct`` and the OVW kernel (a screen of seeded
   configurations, then the tuner's checked race of the top three against dense);
6. ResNet50 end to end at batch 1 and 64, eager and CUDA graphs;
7. the results database, a CSV of every row, the log and the summary for
   ``results/published/``, rewritten after every step (``harness.lease.outputs``).

Each step gets a share of the time left, in proportion to its weight, and stops starting new
work when its share is spent (the step's row says ``cut``); a step is skipped when less than
its minimum is left. It installs nothing, never builds the C++ CPU kernels, and imports optuna
or Ray nowhere. ``--device cuda --interpret`` runs the same steps through Triton's interpreter
on the CPU with tiny layers (CI's dry run).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import env, gpu
from ..records import Device, RunStatus, StepStatus
from ..store import Store
from . import outputs
from . import programme as prog_mod


@dataclass(frozen=True)
class Step:
    number: int
    name: str
    weight: float  # share of the time left, against the steps still to run
    min_s: float  # skipped when less than this is left


STEPS = (Step(1, "versions, GPU clocks, measured ceilings", 15, 5),
         Step(2, "Triton tests on the device", 55, 15),
         Step(3, "compile every planned launch", 50, 10),
         Step(4, "paper layers against cuDNN and the Triton control", 160, 20),
         Step(5, "batch-64 tuning of cs_triton_direct and OVW", 70, 15),
         Step(6, "network end to end, eager and CUDA graphs", 90, 20),
         Step(7, "outputs", 5, 0))
FINAL_RESERVE_S = 5.0  # kept back for the last write of the outputs
FLUSH_EVERY_S = 30.0


class Cut(Exception):
    """SIGTERM: the lease is being ended from outside; write what there is and stop."""


class Lease:
    def __init__(self, out: Path, deadline_s: float, device: Device, threads: int,
                 db: Path | None = None, workers: int | None = None, log=print):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + deadline_s
        self.deadline_s = deadline_s
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = device
        # working files (the store, the Triton cache, the steps' logs) live outside the output
        # folder, which gets consistent copies; removed at the end
        self.work = Path(tempfile.mkdtemp(prefix="sparseconv-lease-"))
        self.db_path = Path(db) if db else self.work / "lease-work.sqlite"
        self.workers = workers or os.cpu_count() or 1
        self._print = log
        self.lines: list[str] = []
        self.prog = prog_mod.programme(device, threads)
        self.steps: list[dict] = []
        self.last_flush = 0.0
        os.environ.setdefault("TRITON_CACHE_DIR", str(self.work / "triton-cache"))
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the tests' and the cache's
        self.store = Store(self.db_path)
        self.fp = dict(env.fingerprint())
        self.fp.update(cudnn=gpu.cudnn_version(), cuda=_torch_cuda())
        self.ident = env.identity_hash(self.fp)
        self.run_id = self.store.start_run(self.fp, self.ident, env.machine_hash(self.fp), {
            "command": "lease", "deadline_s": deadline_s, "device": device.value,
            "out": str(self.out)})
        self.runner = None

    # ---- log and rows ----------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        stamp = f"[{time.monotonic() - self.t0:6.1f}s] " if text else ""
        for line in (text.splitlines() or [""]):
            self.lines.append(stamp + line)
            self._print(line, flush=True)

    def rows(self, step: Step, rows: list[dict]) -> None:
        self.store.add_lease([{"run_id": self.run_id, "step": step.number,
                               "step_name": step.name, **r} for r in rows])

    def left(self) -> float:
        return self.deadline - FINAL_RESERVE_S - time.monotonic()

    def weight(self, step: Step) -> float:
        return self.prog.weights.get(step.number, step.weight)

    def share(self, step: Step) -> float:
        later = sum(self.weight(s) for s in STEPS if s.number >= step.number)
        return max(0.0, self.left()) * self.weight(step) / later

    # ---- the programme -----------------------------------------------------------------------
    def plan_text(self) -> str:
        p = self.prog
        cases = prog_mod.bench_cases(p)
        runnable = sum(c.unsupported is None for c in cases)
        jobs = prog_mod.compile_jobs(p)
        tune = prog_mod.tune_jobs(p)
        shares = self._initial_shares()
        what = {
            1: "torch, Triton, cuDNN, CUDA, driver; SM and memory clocks; copy bandwidth, "
               "fp32 FMA rate, fp16 / TF32 / fp32 GEMM rates",
            2: f"tests/test_kernels_triton.py {' '.join(p.tests)}".strip()
               + (" on the GPU (SPARSECONV_TEST_DEVICE=cuda)" if not p.interpreted else
                  " through the interpreter"),
            3: f"{len(jobs)} launches for sm_{self._arch()}"
               + (f" (the dry run compiles a sample of {len(prog_mod.compile_sample(jobs))})"
                  if p.interpreted else "") + f", {self.workers} processes, one Triton cache",
            4: f"{len(cases)} cases ({runnable} runnable): {len(p.layers)} layers x "
               f"{', '.join(f'{d} b{b}' for d, b in p.groups)} x S "
               f"{'/'.join(map(str, p.sparsities))}",
            5: f"{len(tune)} kernel x layer jobs, batch {p.tune_batch} fp32, default + "
               f"{p.tune_budget} seeded configurations each, race of the top 3 against dense",
            6: f"{p.e2e_net} at {p.e2e_size}x{p.e2e_size}, batch "
               f"{'/'.join(map(str, p.e2e_batches))}, "
               f"{', '.join(f'{pt} {s:g}' for pt, s in p.e2e_patterns)}",
            7: f"{', '.join(outputs.FILES)} in {self.out}, after every step"}
        lines = [f"lease: device {self.device}, deadline {self.deadline_s:.0f} s "
                 f"(steps stop starting work {FINAL_RESERVE_S:.0f} s before it), "
                 f"{self.workers} CPU processes; working store {self.db_path}",
                 f"on {self.fp.get('gpu') or 'no GPU'} (driver {self.fp.get('gpu_driver')}), "
                 f"torch {self.fp.get('torch')}, triton {self.fp.get('triton')}, cuDNN "
                 f"{self.fp.get('cudnn')}, CUDA {self.fp.get('cuda')}, commit "
                 f"{(self.fp.get('git_commit') or '?')[:10]}",
                 "plan (time budget: each step's share of the time left when it starts):"]
        for s in STEPS:
            lines.append(f"  {s.number}. {s.name} ~{shares[s.number]:.0f} s (min {s.min_s:.0f}"
                         f" s): {what[s.number]}")
        if p.interpreted:
            lines.append("  interpreter dry run: tiny layers, timings on the CPU clock, a "
                         "pipeline check, not GPU figures")
        return "\n".join(lines)

    def _initial_shares(self) -> dict:
        left = max(0.0, self.deadline_s - FINAL_RESERVE_S)
        out = {}
        for s in STEPS:
            later = sum(self.weight(t) for t in STEPS if t.number >= s.number)
            out[s.number] = left * self.weight(s) / later
            left -= out[s.number]
        return out

    def _arch(self) -> int:
        from ..capture import gpu_arch

        return (gpu_arch() or 90) if self.device is Device.CUDA else 90

    def run(self) -> int:
        from . import steps as S

        self.say(self.plan_text())
        body = {1: S.versions, 2: S.tests, 3: S.compile_all, 4: S.layers, 5: S.tune,
                6: S.network}
        status = RunStatus.FINISHED
        try:
            for step in STEPS:
                if step.number == 7:
                    break
                self._step(step, body[step.number])
        except (Cut, KeyboardInterrupt):
            status = RunStatus.STOPPED
            self.say("lease: stopped from outside; writing what was measured")
        finally:
            if self.runner is not None:
                self.runner.close()
            out = STEPS[-1]
            self.steps.append({"step": 7, "name": out.name, "status": StepStatus.OK.value,
                               "seconds": 0.0, "note": f"{len(outputs.FILES)} files"})
            self.rows(out, [{"kind": "step", "name": out.name, "status": StepStatus.OK.value, "value": 0.0,
                             "unit": "s", "detail": json.dumps({"files": outputs.FILES})}])
            self.store.finish_run(self.run_id, status)
            self.flush(final=True)
        bad = [s for s in self.steps if s["status"] in (StepStatus.FAILED.value, StepStatus.SKIPPED.value)]
        total = time.monotonic() - self.t0
        self.say(f"lease finished in {total:.0f} s: " + ", ".join(
            f"{s['step']} {s['status']}" for s in self.steps) + f"; outputs in {self.out}")
        self.flush(final=True)
        self.store.close()
        shutil.rmtree(self.work, ignore_errors=True)
        return 1 if any(s["status"] == StepStatus.FAILED.value for s in bad) else 0

    def _step(self, step: Step, body) -> None:
        left = self.left()
        share = self.share(step)
        if left < step.min_s:
            self.say(f"\n== step {step.number} ({step.name}): skipped, {max(left, 0):.0f} s "
                     f"left of the deadline, it needs at least {step.min_s:.0f} s")
            self._record(step, StepStatus.SKIPPED.value, 0.0, f"{max(left, 0):.0f} s left")
            self.flush()
            return
        until = time.monotonic() + max(share, step.min_s)
        self.say(f"\n== step {step.number} ({step.name}): up to {until - time.monotonic():.0f} s")
        t = time.monotonic()
        try:
            status, note = body(self, step, until)
        except (Cut, KeyboardInterrupt):
            self._record(step, StepStatus.CUT.value, time.monotonic() - t, "stopped from outside")
            raise
        except Exception as e:  # noqa: BLE001 - a broken step must not lose the others
            import traceback

            self.say(traceback.format_exc()[-3000:])
            status, note = StepStatus.FAILED.value, f"{type(e).__name__}: {str(e)[:300]}"
        self.say(f"step {step.number}: {status} in {time.monotonic() - t:.0f} s"
                 + (f": {note}" if note else ""))
        self._record(step, status, time.monotonic() - t, note)
        self.flush()

    def _record(self, step: Step, status: str, seconds: float, note: str | None) -> None:
        self.steps.append({"step": step.number, "name": step.name, "status": status,
                           "seconds": seconds, "note": note})
        self.rows(step, [{"kind": "step", "name": step.name, "status": status,
                          "value": seconds, "unit": "s", "detail": json.dumps({"note": note})}])

    # ---- outputs -----------------------------------------------------------------------------
    def maybe_flush(self) -> None:
        if time.monotonic() - self.last_flush > FLUSH_EVERY_S:
            self.flush()

    def flush(self, final: bool = False) -> None:
        from . import summary

        self.last_flush = time.monotonic()
        outputs.copy_db(self.store.db, self.out / outputs.DB)
        outputs.write_csv(outputs.every_row(self.store.db), self.out / outputs.ROWS)
        lease = self.store.lease(self.run_id)
        m = self.store.measurements(fp_hash=self.ident)
        m = m[m.run_id == self.run_id]
        e = self.store.e2e(self.ident)
        e = e[e.run_id == self.run_id]
        info = self.info()
        df = summary.build(m, e, lease, info)
        df.to_csv(self.out / outputs.SUMMARY, index=False)
        ceilings = [{"name": r.name, "value": r.value, "unit": r.unit,
                     "how": json.loads(r.detail).get("how", "")}
                    for r in lease[lease.kind == "ceiling"].itertuples()]
        outputs.write_text(summary.readme(df, info, ceilings, self.steps),
                           self.out / outputs.README)
        outputs.write_text("\n".join(self.lines) + "\n", self.out / outputs.LOG)
        bad = outputs.check(self.out)
        if bad and final:
            self.say("outputs: " + "; ".join(bad))

    def fp_machine(self) -> str:
        return env.machine_hash(self.fp)

    def triton_cache(self) -> str:
        return os.environ.get("TRITON_CACHE_DIR", "")

    def info(self) -> dict:
        fp = self.fp
        return {"device": self.device.value, "gpu": fp.get("gpu"),
                "driver": fp.get("gpu_driver"), "torch": fp.get("torch"),
                "triton": fp.get("triton"), "cudnn": fp.get("cudnn"), "cuda": fp.get("cuda"),
                "python": fp.get("python"), "commit": fp.get("git_commit"),
                "dirty": fp.get("git_dirty"), "date": time.strftime("%Y-%m-%d")}


def _torch_cuda() -> str | None:
    import torch

    return torch.version.cuda
