"""Each engine timed alone, in a process of its own: engines slow each other down inside one
process (thread pools, caches, allocators), so every figure interleaved in the e2e run is
checked against one taken alone, and where the two differ by more than
``records.ALONE_DIFFERS`` the alone one is reported (``EngineResult.with_alone``).

``python -m harness.engines.alone SPEC.json`` is the child: it prepares one engine on one
network (or the project's sparse network, rebuilt from the case), times it with the run's
timing options and prints one JSON line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALONE_TIMEOUT = 900.0


def check(case, rows: dict, nets: dict, x, opts) -> dict:
    """``rows`` ({variant: EngineResult}) with every measured one timed alone as well."""
    import torch

    from ..records import Status

    out = dict(rows)
    with tempfile.TemporaryDirectory(prefix="sparseconv-alone-") as tmp:
        files = {}
        torch.save(x.cpu(), f"{tmp}/x.pt")
        for name, row in rows.items():
            if row.status != Status.OK.value or not row.interleaved_s:
                continue
            spec = {"variant": name, "x": f"{tmp}/x.pt", "threads": case.threads,
                    "opts": dataclasses.asdict(opts)}
            if row.network == "sparse":
                spec["case"] = {**dataclasses.asdict(case), "device": case.device.value}
            else:
                if row.network not in files:
                    files[row.network] = f"{tmp}/{row.network}.pt"
                    torch.save(nets[row.network], files[row.network])
                spec["model"] = files[row.network]
            Path(f"{tmp}/spec.json").write_text(json.dumps(spec))
            got, why = _child(f"{tmp}/spec.json")
            out[name] = row.with_alone(got.get("median_s"), got.get("cpu_per_wall"), why)
    return out


def _child(spec: str) -> tuple[dict, str | None]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        p = subprocess.run([sys.executable, "-m", "harness.engines.alone", spec], env=env,
                           capture_output=True, text=True, timeout=ALONE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {}, f"not timed alone: no answer within {ALONE_TIMEOUT:.0f} s"
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line), None
    err = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {}, f"not timed alone: exit {p.returncode}: {err}"[:300]


def main(spec_file: str) -> int:
    import torch

    from .. import engines
    from ..records import Device, E2ECase, TimingOptions
    from ..timing import interleaved_cpu, prepare_process

    prepare_process()  # as in the worker: one allocator regime, ahead of other work
    spec = json.loads(Path(spec_file).read_text())
    threads = spec["threads"]
    torch.set_num_threads(threads)
    x = torch.load(spec["x"])
    opts = TimingOptions(**spec["opts"])
    if "case" in spec:
        from ..sparse_model import build_case

        _, _, fn = build_case(E2ECase(**{**spec["case"], "device": Device.CPU}))
    else:
        model = torch.load(spec["model"], weights_only=False)
        fn = engines.get(engines.Variant.parse(spec["variant"]).engine).prepare(model, x,
                                                                                threads)
    with torch.inference_mode():
        t = interleaved_cpu({"v": (fn, x)}, rounds=opts.rounds, min_sample=opts.min_sample,
                            warmup=opts.warmup)
    print(json.dumps({"median_s": t.stats["v"].median, "cpu_per_wall": t.cpu_per_wall["v"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
