"""Sweep runner: cases go one at a time to a worker process; each result is committed to the
store as it arrives. A case that passes its time limit is recorded as ``timeout`` and the worker
is replaced; one that kills the worker is ``runtime_error``. Ctrl-C stops after the case in
flight (a second Ctrl-C aborts at once); everything finished is already saved."""

from __future__ import annotations

import json
import multiprocessing as mp
import signal
import sys
import time

from tqdm import tqdm

from shapes import ConvLayer

from . import worker as worker_mod


class WorkerDied(Exception):
    pass


class WorkerTimeout(Exception):
    pass


class Worker:
    def __init__(self):
        self.proc = None
        self.conn = None

    def start(self):
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_mod.serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent

    def call(self, msg, timeout: float, stop_check=None):
        if self.proc is None or not self.proc.is_alive():
            self.start()
        self.conn.send(msg)
        t_end = time.monotonic() + timeout
        while True:
            left = t_end - time.monotonic()
            if left <= 0:
                self.kill()
                raise WorkerTimeout(f"no result within {timeout:g} s")
            try:
                if self.conn.poll(min(left, 0.25)):
                    return self.conn.recv()
            except (EOFError, OSError):
                pass
            if not self.proc.is_alive():
                code = self.proc.exitcode
                self.kill()
                sig = f" (signal {-code})" if code is not None and code < 0 else ""
                raise WorkerDied(f"worker process died with exit code {code}{sig}")

    def kill(self):
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(5)
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None

    def close(self):
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(("stop",))
                self.proc.join(5)
            except (OSError, BrokenPipeError):
                pass
        self.kill()


def record(case: dict, res: dict, run_id: int, fp_hash: str, machine_hash: str) -> dict:
    lay = ConvLayer(**case["layer"])
    m = {"run_id": run_id, "fp_hash": fp_hash, "machine_hash": machine_hash,
         "case_key": case["key"], "net": lay.net, "layer": lay.name, "layer_index": lay.index,
         "shape": lay.shape_str, "count": lay.count, "cin": lay.cin, "cout": lay.cout,
         "kh": lay.kh, "kw": lay.kw, "stride": lay.stride, "padding": lay.padding, "h": lay.h,
         "w": lay.w, "batch": case["batch"], "dtype": case["dtype"], "device": case["device"],
         "threads": case["threads"], "pattern": case["pattern"], "sparsity": case["sparsity"],
         "param": case["param"], "kernel": case["kernel"], "config": case["config"],
         "flops": float(lay.flops(case["batch"]))}
    m.update({k: v for k, v in res.items() if k != "traceback"})
    return m


class _Stop:
    """First Ctrl-C: finish the case in flight, then stop. Second: abort now."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after the case in flight (Ctrl-C again to abort now)", file=sys.stderr)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _dense_key(case):
    lay = case["layer"]
    return (lay["net"], lay["name"], case["batch"], case["dtype"], case["device"],
            case["threads"])


def sweep(cases, store, run_id, fp_hash, machine_hash, *, resume=True, case_timeout=300.0,
          init_timeout=1800.0, timing_opts=None, progress=True, dense_kernel=None):
    """Run every case not yet recorded; returns counts by status for this call."""
    timing_opts = timing_opts or {}
    done = store.done_keys(fp_hash) if resume else set()
    todo = [c for c in cases if c["key"] not in done]
    counts = {"skipped (already measured)": len(cases) - len(todo)}
    dense_best: dict = {}  # dense key -> {"e2e": (median, layout, kernel), "kernel": (...)}

    def note_dense(key, median, kmedian, layout, kernel):
        d = dense_best.setdefault(key, {})
        if "e2e" not in d or median < d["e2e"][0]:
            d["e2e"] = (median, layout, kernel)
        if kmedian is not None and ("kernel" not in d or kmedian < d["kernel"][0]):
            d["kernel"] = (kmedian, layout, kernel)

    if resume:  # dense baselines measured by an earlier, interrupted run of the same fingerprint
        df = store.measurements(fp_hash=fp_hash)
        for _, r in df[(df.pattern == "dense") & (df.status == "ok")].iterrows():
            note_dense((r.net, r.layer, r.batch, r.dtype, r.device, r.threads), r.median_s,
                       r.kernel_median_s, json.loads(r.config)["layout"], r.kernel)
    wk = Worker()
    avail = {}
    names = sorted({c["kernel"] for c in todo if c["status"] is None})
    bar = tqdm(total=len(todo), desc="bench", unit="case", disable=not progress,
               dynamic_ncols=True, file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 10)
    try:
        with _Stop() as stop:
            if names:
                bar.set_postfix_str("building / loading kernels")
                try:
                    avail = wk.call(("init", names), init_timeout)["reasons"]
                except (WorkerDied, WorkerTimeout) as e:
                    avail = {n: f"kernel set-up failed: {e}" for n in names}
            for case in todo:
                if stop.requested:
                    counts["not run (stopped)"] = counts.get("not run (stopped)", 0) + 1
                    continue
                lay = case["layer"]
                bar.set_postfix_str(f"{case['kernel']} {lay['net']}:{lay['name']} "
                                    f"S={case['sparsity']:g}", refresh=False)
                if case["status"] == "unsupported":
                    res = {"status": "unsupported", "reason": case["reason"]}
                elif avail.get(case["kernel"]):
                    res = {"status": "unsupported", "reason": avail[case["kernel"]]}
                else:
                    spec = dict(case)
                    best = dense_best.get(_dense_key(case))
                    if best:
                        spec["dense_layout"], spec["dense_kernel"] = best["e2e"][1:]
                        spec["dense_kernel_layout"] = best.get("kernel", best["e2e"])[1]
                    elif dense_kernel:
                        spec["dense_layout"], spec["dense_kernel"] = "nchw", dense_kernel
                    try:
                        res = wk.call(("case", spec, timing_opts), case_timeout)
                    except WorkerTimeout as e:
                        res = {"status": "timeout", "reason": str(e)}
                    except WorkerDied as e:
                        res = {"status": "runtime_error", "reason": str(e)}
                m = record(case, res, run_id, fp_hash, machine_hash)
                store.add(m)
                counts[m["status"]] = counts.get(m["status"], 0) + 1
                if case["pattern"] == "dense" and m["status"] == "ok":
                    note_dense(_dense_key(case), m["median_s"], m.get("kernel_median_s"),
                               case["config"]["layout"], case["kernel"])
                bar.update(1)
    finally:
        bar.close()
        wk.close()
    return counts
