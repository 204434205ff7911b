"""The lease's output folder: what a lease returns, rewritten after every step so a lease cut
short still returns what it measured.

A lease returns at most 8 files of at most 16 MiB each, named with letters, digits, '.', '_'
and '-' only, from one folder. This one writes five: the results database (a consistent copy of
the working store, one file, no WAL beside it), a CSV of every row of every table with its step,
the log, and the summary meant for ``results/published/`` (``summary.csv`` and ``README.md``).
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pandas as pd

MAX_FILES = 8
MAX_BYTES = 16 << 20
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
DB, ROWS, LOG, SUMMARY, README = ("lease.sqlite", "lease_rows.csv", "lease.log", "summary.csv",
                                  "README.md")
FILES = (DB, ROWS, LOG, SUMMARY, README)
# which step filled each table (the lease table names its own steps)
TABLE_STEP = {"measurements": 4, "tuning": 5, "e2e": 6}
SAMPLE_COLUMNS = ("samples", "kernel_samples", "dense_samples")


class OutputError(RuntimeError):
    pass


def check(folder: Path) -> list[str]:
    """What in ``folder`` breaks a lease's limits (empty: nothing)."""
    files = [f for f in folder.iterdir()]
    bad = []
    if len(files) > MAX_FILES:
        bad.append(f"{len(files)} entries in {folder}, at most {MAX_FILES} come back")
    for f in files:
        if not f.is_file():
            bad.append(f"{f.name} is not a plain file")
        elif f.stat().st_size > MAX_BYTES:
            bad.append(f"{f.name} has {f.stat().st_size} bytes, over {MAX_BYTES}")
        if not NAME.match(f.name):
            bad.append(f"{f.name!r} has characters outside [A-Za-z0-9._-]")
    return bad


def copy_db(src: sqlite3.Connection, dst: Path) -> None:
    """A consistent single-file copy of the working store (SQLite's online backup), shrunk under
    the size limit if it must be: raw samples go first (medians and IQRs stay)."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    out = sqlite3.connect(str(tmp))
    try:
        src.backup(out)
        out.execute("PRAGMA journal_mode = DELETE")
        out.commit()
        size = tmp.stat().st_size
        if size > MAX_BYTES:
            cols = {r[1] for r in out.execute("PRAGMA table_info(measurements)")}
            sets = ", ".join(f"{c} = NULL" for c in SAMPLE_COLUMNS if c in cols)
            if sets:
                out.execute(f"UPDATE measurements SET {sets}")
            out.execute("UPDATE e2e SET samples = NULL")
            out.commit()
            out.execute("VACUUM")
    finally:
        out.close()
    tmp.replace(dst)


def every_row(db: sqlite3.Connection) -> pd.DataFrame:
    """Every row of the lease's tables, one frame: ``table`` and ``step`` first."""
    parts = []
    for table in ("lease", "measurements", "tuning", "e2e"):
        try:
            df = pd.read_sql_query(f"SELECT * FROM {table} ORDER BY rowid", db)
        except (pd.errors.DatabaseError, sqlite3.DatabaseError):
            continue
        if df.empty:
            continue
        if table != "lease":
            df.insert(0, "step", TABLE_STEP[table])
        df.insert(0, "table", table)
        parts.append(df)
    if not parts:
        return pd.DataFrame(columns=["table", "step"])
    return pd.concat(parts, ignore_index=True, sort=False)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False)
    if tmp.stat().st_size > MAX_BYTES:  # raw samples first, then the oldest rows
        df = df.drop(columns=[c for c in SAMPLE_COLUMNS + ("samples",) if c in df.columns])
        df.to_csv(tmp, index=False)
        while tmp.stat().st_size > MAX_BYTES and len(df) > 1:
            df = df.iloc[len(df) // 10 + 1:]
            df.to_csv(tmp, index=False)
    tmp.replace(path)


def write_text(text: str, path: Path) -> None:
    data = text.encode()
    if len(data) > MAX_BYTES:  # the log's tail is what explains how it ended
        data = b"[... earlier lines cut to stay under 16 MiB ...]\n" + data[-(MAX_BYTES - 100):]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
