"""``python -m harness report``: write the self-contained HTML report."""

from __future__ import annotations

from .common import DEFAULT_DB


def add_parser(sub):
    p = sub.add_parser("report", help="write the self-contained HTML speedup report")
    p.add_argument("--db", default=str(DEFAULT_DB))
    p.add_argument("--out", default="reports/index.html")
    p.add_argument("--plans", default="results/plans", help="autotuner plans to show")
    p.add_argument("--published", default="results/published",
                   help="committed GPU lease summaries shown beside this database's rows")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..report import build  # matplotlib and seaborn: seconds no other command should pay

    out = build(args.db, args.out, args.plans, args.published)
    print(f"report written to {out.resolve()}")
    return 0
