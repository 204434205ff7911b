"""``python -m harness lease``: the GPU programme within a deadline, into one output folder.

``--publish DIR`` instead copies a finished lease's summary (``summary.csv``, ``README.md``)
into ``results/published/<date>_<gpu>/`` for committing."""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

from .. import UsageError
from .common import device_of, positive

PUBLISHED = Path("results") / "published"


def add_parser(sub):
    p = sub.add_parser("lease", help="the whole GPU programme within a deadline (a GPU lease)")
    p.add_argument("--out", help="folder for the results (at most 8 files come back)")
    p.add_argument("--deadline", type=positive(float, 0, strict=True), default=450.0,
                   help="seconds from the start by which everything is written (default 450)")
    p.add_argument("--device", default="cuda", choices=["cuda"],
                   help="the lease's device (add --interpret for the CPU dry run)")
    p.add_argument("--interpret", action="store_true",
                   help="Triton's interpreter on the CPU, tiny layers: the CI dry run")
    p.add_argument("--threads", type=positive(int, 1), default=None)
    p.add_argument("--workers", type=positive(int, 1), default=None,
                   help="parallel processes for the tests and the compiles (default: cores)")
    p.add_argument("--db", default=None,
                   help="working results database (default: a temporary file; the output "
                        "folder gets a copy after every step)")
    p.add_argument("--publish", metavar="OUT",
                   help="copy a finished lease's summary.csv and README.md from OUT into "
                        "results/published/<date>_<gpu>/ (nothing is measured)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.publish:
        return publish(Path(args.publish))
    if not args.out:
        raise UsageError("--out DIR is required (the folder the lease's files go to)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    device = device_of(args)  # before the Triton kernels are first imported
    from ..lease import Cut, Lease

    def cut(*_):
        raise Cut()

    old = signal.signal(signal.SIGTERM, cut)
    try:
        lease = Lease(out, args.deadline, device, args.threads or os.cpu_count() or 1,
                      db=Path(args.db) if args.db else None, workers=args.workers)
        return lease.run()
    finally:
        signal.signal(signal.SIGTERM, old)


def publish(src: Path) -> int:
    from ..lease import outputs

    files = [src / outputs.SUMMARY, src / outputs.README]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"{src} has no {', '.join(missing)}: give the --out folder of a lease")
    import pandas as pd

    df = pd.read_csv(files[0])
    if df.empty or "device" not in df or (df.device != "cuda").any():
        raise UsageError(f"{files[0]} holds no GPU figures (an interpreter dry run or an empty "
                         f"lease): not published")
    gpu = str(df.gpu.iloc[0]) if "gpu" in df else "gpu"
    date = str(df.date.iloc[0]) if "date" in df else "undated"
    name = f"{date}_{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}"
    dst = PUBLISHED / name
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dst / f.name)
    print(f"published {len(files)} files to {dst}: commit them (git add {dst})")
    return 0
