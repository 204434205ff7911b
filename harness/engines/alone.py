"""Each engine timed alone, in a process of its own: engines slow each other down inside one
process (thread pools, caches, allocators), so every figure interleaved in the e2e run is
checked against one taken alone, and where the two differ by more than
``records.ALONE_DIFFERS`` the alone one is reported (``EngineResult.with_alone``), and then
every engine's alone one (``records.one_source``).

The alone processes are timed in interleaved rounds too, as the engines inside the run are:
every engine's process is started and prepared first (one at a time, so none is built while
another is timed), then each round gives each process in turn one block (a pause, one untimed
call, then the timed calls) while the others wait idle on their input. Processes are started
while the memory lasts (``memory_room``); those that do not fit form a later group. A shared
machine runs faster and slower by turns (measured on a 2-core VM: the same sparse ResNet50 at 10-13 ms for
tens of seconds, then at 19-22 ms, within one process); processes timed one after another
each caught one phase, so an engine's alone figure depended on when it ran, and compared
with another's, on the machine's phases rather than on the engines.

``python -m harness.engines.alone SPEC.json`` is the child: it prepares one engine on one
network (or the project's sparse network, rebuilt from the case), answers one JSON line when
ready, then one JSON line per ``go`` line it reads, and exits at the end of its input."""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALONE_TIMEOUT = 900.0  # seconds for a child to be ready, and for one of its blocks


def check(case, rows: dict, nets: dict, x, opts, gap: float = 0.02,
          decisions: dict | None = None) -> dict:
    """``rows`` ({variant: EngineResult}) with every measured one timed alone as well, the
    processes in interleaved rounds (``gap``: seconds of pause before each block, as the
    interleaved run has). The project's network is built again in its process with
    ``decisions`` (``sparse_model.Report.decisions``): the very network the run measured,
    not one whose measured choices (dense layout, fused block ends, ...) came out otherwise."""
    import torch

    from ..records import Status, one_source

    out = dict(rows)
    with tempfile.TemporaryDirectory(prefix="sparseconv-alone-") as tmp:
        files, specs = {}, {}
        torch.save(x.cpu(), f"{tmp}/x.pt")
        for i, (name, row) in enumerate(rows.items()):
            if row.status != Status.OK.value or not row.interleaved_s:
                continue
            spec = {"variant": name, "x": f"{tmp}/x.pt", "threads": case.threads,
                    "opts": dataclasses.asdict(opts)}
            if row.network == "sparse":
                spec["case"] = {**dataclasses.asdict(case), "device": case.device.value}
                spec["decisions"] = decisions
            else:
                if row.network not in files:
                    files[row.network] = f"{tmp}/{row.network}.pt"
                    torch.save(nets[row.network], files[row.network])
                spec["model"] = files[row.network]
            specs[name] = f"{tmp}/spec{i}.json"
            Path(specs[name]).write_text(json.dumps(spec))
        got = timed_apart({name: [sys.executable, "-m", "harness.engines.alone", f]
                           for name, f in specs.items()}, opts.rounds, gap)
        for name, (median, cpu, why, _) in got.items():
            out[name] = rows[name].with_alone(median, cpu, why)
    return one_source(out, groups=len({g for m, _, _, g in got.values() if m is not None}))


class _Child:
    """One alone process: its lines read by a thread, so every wait has a deadline."""

    def __init__(self, argv: list[str]):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.p = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, bufsize=1,
                                  encoding="utf-8", errors="replace")
        self.lines: queue.Queue = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._read, args=(self.p.stdout, self.lines.put, True),
                         daemon=True).start()
        self._err_reader = threading.Thread(target=self._read, daemon=True,
                                            args=(self.p.stderr, self.err.append, False))
        self._err_reader.start()

    @staticmethod
    def _read(stream, put, end: bool):
        for line in stream:
            put(line)
        if end:
            put(None)  # the end of the child's output

    def answer(self, timeout: float) -> tuple[dict | None, str | None]:
        """The child's next JSON line (other lines, such as an engine's banner, skipped)."""
        end = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(end - time.monotonic(), 0))
            except queue.Empty:
                return None, f"not timed alone: no answer within {timeout:.0f} s"
            if line is None:  # its output closed: it ended (or is made to)
                try:
                    self.p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.p.kill()
                    self.p.wait()
                self._err_reader.join(timeout=5)
                err = next((e.strip() for e in reversed(self.err) if e.strip()), "no output")
                return None, f"not timed alone: exit {self.p.returncode}: {err}"[:300]
            if line.startswith("{"):
                try:
                    return json.loads(line), None
                except ValueError:
                    pass  # an engine's own output that looks like JSON: not an answer

    def ask(self, timeout: float) -> tuple[dict | None, str | None]:
        try:
            self.p.stdin.write("go\n")
            self.p.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child is gone: answer() says how it ended
        return self.answer(timeout)

    def close(self, wait: float = 30):
        """End the child: its input closed (a ready child exits then), killed after ``wait``
        seconds (0: a child that did not answer in time)."""
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def timed_apart(children: dict, rounds: int, gap: float = 0.02,
                timeout: float = ALONE_TIMEOUT, room=None) -> dict:
    """{name: argv} of alone children -> {name: (median seconds or None, CPU/wall or None, why
    not timed or None, the group it was started in, from 1)}. Each child is started and
    waited for in turn (it answers when prepared); then ``rounds`` rounds ask every ready
    child for one block, in turn, after a ``gap`` pause. A child that fails or does not
    answer within ``timeout`` is left out of the rounds that follow, with the reason.
    Children are started while there is memory for one more (``room(ready)``, given the
    ready children's processes; default ``memory_room``); the rest wait for a later group,
    each group timed in rounds of its own."""
    room = room or memory_room
    pending, out, group = list(children.items()), {}, 0
    while pending:
        ready: dict = {}
        group += 1
        try:
            while pending and (not ready or room([c.p.pid for c in ready.values()])):
                name, argv = pending.pop(0)
                c = _Child(argv)
                try:
                    got, why = c.answer(timeout)
                except BaseException:
                    c.close(wait=0)
                    raise
                if got is None or "ready" not in got:
                    c.close(wait=0)
                    out[name] = (None, None, why or f"not timed alone: {got}", group)
                    continue
                ready[name] = c
            out.update({n: (*r, group) for n, r in _rounds(ready, rounds, gap, timeout).items()})
        finally:
            for c in ready.values():
                c.close()
    return {name: out[name] for name in children}


def _rounds(ready: dict, rounds: int, gap: float, timeout: float) -> dict:
    """The interleaved rounds over ``ready`` children (one that fails leaves them)."""
    import statistics

    out, samples, cpu = {}, {n: [] for n in ready}, {n: [] for n in ready}
    live = dict(ready)
    for _ in range(rounds):
        for name, c in list(live.items()):
            time.sleep(gap)  # the previous process's threads go idle first
            got, why = c.ask(timeout)
            if got is None or "s" not in got:
                c.close(wait=0)
                why = why or f"not timed alone: answered {json.dumps(got)[:100]}"
                del live[name]
                out[name] = (None, None, why)
                continue
            samples[name].append(got["s"])
            cpu[name].append(got["cpu_per_wall"])
    for name in live:
        out[name] = (statistics.median(samples[name]), statistics.median(cpu[name]), None)
    return out


def memory_room(pids: list[int]) -> bool:
    """Whether one more alone process fits: the memory available now is at least twice the
    largest of the ready ones (a process's peak while it prepares its engine is above what it
    keeps) and leaves a tenth of the machine's memory free. Without psutil: always."""
    try:
        import psutil
    except ImportError:
        return True
    largest = 0
    for pid in pids:
        try:
            largest = max(largest, psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            pass
    vm = psutil.virtual_memory()
    return vm.available - 2 * largest >= 0.1 * vm.total


def main(spec_file: str) -> int:
    import torch

    from .. import engines
    from ..records import Device, E2ECase, TimingOptions
    from ..timing import block, prepare_process, warmed_reps

    prepare_process()  # as in the worker: one allocator regime, ahead of other work
    spec = json.loads(Path(spec_file).read_text())
    threads = spec["threads"]
    torch.set_num_threads(threads)
    x = torch.load(spec["x"])
    opts = TimingOptions(**spec["opts"])
    if "case" in spec:
        from ..sparse_model import build_case

        _, _, fn = build_case(E2ECase(**{**spec["case"], "device": Device.CPU}),
                              spec.get("decisions"))
    else:
        model = torch.load(spec["model"], weights_only=False)
        fn = engines.get(engines.Variant.parse(spec["variant"]).engine).prepare(model, x,
                                                                                threads)
    with torch.inference_mode():
        reps = warmed_reps(fn, x, opts.warmup, opts.min_sample)
        print(json.dumps({"ready": reps}), flush=True)
        for line in sys.stdin:
            if line.strip() == "go":  # one block, as a round of interleaved_cpu times it
                t, cpu = block(fn, x, reps)
                print(json.dumps({"s": t, "cpu_per_wall": cpu}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
