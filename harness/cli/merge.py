"""``python -m harness merge A.sqlite B.sqlite ... -o ALL.sqlite``."""

from __future__ import annotations

from pathlib import Path

from .. import UsageError
from ..merge import merge


def add_parser(sub):
    p = sub.add_parser("merge", help="merge results databases without duplicating a case")
    p.add_argument("inputs", nargs="+", help="results databases to merge")
    p.add_argument("-o", "--out", required=True, help="the merged database (created or extended)")
    p.set_defaults(func=run)


def run(args) -> int:
    inputs = [Path(p) for p in args.inputs]
    out = Path(args.out)
    for p in inputs:
        if not p.exists():
            raise UsageError(f"no results database at {p}")
        if p.resolve() == out.resolve():
            raise UsageError(f"{p} is the output too; merge into a new file")
    counts = merge(inputs, out)
    print(f"merged {len(inputs)} database(s) into {out}: " +
          ", ".join(f"{n} {k}" for k, n in counts.items()))
    return 0
