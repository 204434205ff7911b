"""``python -m harness export``: the results table as CSV or Parquet (with speedups)."""

from __future__ import annotations

from pathlib import Path

from .. import UsageError, analysis
from ..outputs import output_file, without_formulas, writing
from ..store import Store
from .common import DEFAULT_DB


def add_parser(sub):
    p = sub.add_parser("export", help="write measurements to CSV or Parquet")
    p.add_argument("--db", default=str(DEFAULT_DB))
    p.add_argument("--format", choices=["csv", "parquet"], default="csv")
    p.add_argument("--out", help="output file (default: results/measurements.<format>)")
    p.add_argument("--all", action="store_true", help="every row, not only the latest per case")
    p.set_defaults(func=run)


def run(args) -> int:
    out = output_file(args.out or Path(args.db).with_name(f"measurements.{args.format}"))
    store = Store(args.db, readonly=True)
    df = analysis.with_speedups(store.measurements(latest=not args.all))
    with writing(out):
        if args.format == "csv":  # opened in spreadsheets: no cell may run as a formula
            without_formulas(df).to_csv(out, index=False)
        else:
            try:
                df.to_parquet(out, index=False)
            except ImportError as e:
                raise UsageError(f"parquet export needs pyarrow: {e}") from None
    print(f"wrote {len(df)} rows to {out}")
    return 0
