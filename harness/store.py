"""Crash-safe results store: SQLite in WAL mode, append-only, one commit per measurement.

A killed sweep loses at most the case in flight; rerunning skips the cases already recorded for
the same fingerprint (``done_keys``). Several processes may write one file at once (WAL plus a
busy timeout). Reads take the latest row per (fingerprint, case).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from pathlib import Path

import pandas as pd

from . import UsageError
from .records import E2EMeasurement, Measurement, RunStatus, Status

APP = "sparseconv-bench"
SCHEMA_VERSION = 2  # 2: columns from records.Measurement (source hash, element-wise error, ...)


def _sql_type(annotation: str) -> str:
    a = str(annotation)
    if a.startswith(("int", "bool")):
        return "INTEGER"
    if a.startswith("float"):
        return "REAL"
    return "TEXT"


# column -> SQL type, one per field of records.Measurement
MEASUREMENT_COLUMNS = {f.name: _sql_type(f.type) for f in dataclasses.fields(Measurement)}
# column -> SQL type, one per field of records.E2EMeasurement
E2E_COLUMNS = {f.name: _sql_type(f.type) for f in dataclasses.fields(E2EMeasurement)}

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL, finished REAL, fp_hash TEXT,
    machine_hash TEXT, fingerprint TEXT, args TEXT, status TEXT);
CREATE TABLE IF NOT EXISTS measurements (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    {", ".join(f"{k} {v}" for k, v in MEASUREMENT_COLUMNS.items())});
CREATE INDEX IF NOT EXISTS m_case ON measurements (fp_hash, case_key);
CREATE TABLE IF NOT EXISTS tuning (
    id INTEGER PRIMARY KEY AUTOINCREMENT, tune_key TEXT, identity TEXT, kernel TEXT,
    source_hash TEXT, shape TEXT, batch INTEGER, dtype TEXT, pattern TEXT, sparsity REAL,
    config TEXT, status TEXT, median_s REAL, kernel_median_s REAL, dense_median_s REAL,
    rel_err REAL, created REAL);
CREATE INDEX IF NOT EXISTS t_key ON tuning (tune_key);
CREATE TABLE IF NOT EXISTS e2e (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    {", ".join(f"{k} {v}" for k, v in E2E_COLUMNS.items())});
CREATE INDEX IF NOT EXISTS e_case ON e2e (fp_hash, case_key);
CREATE TABLE IF NOT EXISTS lease (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER, step INTEGER, step_name TEXT,
    kind TEXT, name TEXT, status TEXT, value REAL, unit TEXT, detail TEXT, created REAL);
"""


_STATEMENTS = [stmt.strip() for stmt in _SCHEMA.split(";") if stmt.strip()]


class StoreError(UsageError):
    pass


class Store:
    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise StoreError(f"no results database at {self.path}; run "
                                 f"`python -m harness bench` first")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif self.path.is_dir():
            raise StoreError(f"{self.path} is a directory, not a results database")
        try:
            self.db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
            self.db.execute("PRAGMA busy_timeout = 60000")
            for attempt in range(200):  # switching a new file to WAL does not wait on a
                try:                    # busy file: a process creating it holds it briefly
                    self.db.execute("PRAGMA journal_mode = WAL")
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or attempt == 199:
                        raise
                    time.sleep(0.05)
            self.db.execute("PRAGMA synchronous = NORMAL")
            tables = {r[0] for r in self.db.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a results database (SQLite says: {e})") from None
        if tables and "meta" not in tables:
            raise StoreError(f"{self.path} is an SQLite file of another program (tables: "
                             f"{', '.join(sorted(tables))}); choose another --db")
        self._init(tables)

    def _init(self, tables):
        # one IMMEDIATE transaction: a process opening the file meanwhile sees either nothing
        # or the whole schema with its meta rows (executescript would commit table by table)
        with self._tx():
            for stmt in _STATEMENTS:  # idempotent: also adds tables a newer release introduced
                self.db.execute(stmt)
            if not tables:
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('app', ?)", (APP,))
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                                (str(SCHEMA_VERSION),))
            meta = dict(self.db.execute("SELECT key, value FROM meta"))
            if meta.get("app") != APP:
                raise StoreError(f"{self.path} belongs to {meta.get('app')!r}, not {APP}")
            if int(meta.get("schema_version", 0)) != SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema version {meta.get('schema_version')}; "
                                 f"this harness reads version {SCHEMA_VERSION}")
            for table, columns in (("measurements", MEASUREMENT_COLUMNS), ("e2e", E2E_COLUMNS)):
                have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
                for name, kind in columns.items():  # nullable columns a newer release added
                    if name not in have:
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    class _Tx:
        def __init__(self, db):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, exc_type, *_):
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self):
        return self._Tx(self.db)

    # ---- runs -----------------------------------------------------------------------------
    def start_run(self, fp: dict, fp_hash: str, machine_hash: str, args: dict) -> int:
        with self._tx():
            cur = self.db.execute(
                "INSERT INTO runs (started, fp_hash, machine_hash, fingerprint, args, status) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), fp_hash, machine_hash, json.dumps(fp, default=str),
                 json.dumps(args, default=str), RunStatus.RUNNING.value))
            return cur.lastrowid

    def finish_run(self, run_id: int, status: RunStatus = RunStatus.FINISHED) -> None:
        with self._tx():
            self.db.execute("UPDATE runs SET finished = ?, status = ? WHERE run_id = ?",
                            (time.time(), RunStatus(status).value, run_id))

    def note_machine(self, fp: dict, fp_hash: str, machine_hash: str, args: dict) -> None:
        """Record a machine's fingerprint (a cluster node's) as a finished run of its own, so
        reports can name the machine behind its rows."""
        self.finish_run(self.start_run(fp, fp_hash, machine_hash, args))

    # ---- measurements --------------------------------------------------------------------
    def add(self, m: Measurement) -> None:
        """Append one measurement and commit it (the unit of crash safety)."""
        if not isinstance(m, Measurement):
            raise TypeError(f"Store.add takes a records.Measurement, got {type(m).__name__}")
        row = m.row()
        if row["created"] is None:
            row["created"] = time.time()
        cols = ", ".join(row)
        with self._tx():
            self.db.execute(f"INSERT INTO measurements ({cols}) VALUES "
                            f"({', '.join('?' * len(row))})", list(row.values()))

    def done_keys(self, fp_hash: str, retry_failed: bool = False) -> set[str]:
        """Cases already measured under this identity (with ``retry_failed``, only those whose
        latest measurement is ok)."""
        q = ("SELECT case_key, status FROM measurements WHERE id IN (SELECT MAX(id) FROM "
             "measurements WHERE fp_hash = ? GROUP BY case_key)")
        return {k for k, st in self.db.execute(q, (fp_hash,))
                if not retry_failed or Status(st) is Status.OK}

    def measurements(self, latest: bool = True, fp_hash: str | None = None) -> pd.DataFrame:
        where = "WHERE fp_hash = ?" if fp_hash else ""
        params = (fp_hash,) if fp_hash else ()
        if latest:
            q = (f"SELECT * FROM measurements WHERE id IN (SELECT MAX(id) FROM measurements "
                 f"{where} GROUP BY fp_hash, case_key) ORDER BY id")
        else:
            q = f"SELECT * FROM measurements {where} ORDER BY id"
        return pd.read_sql_query(q, self.db, params=params)

    def runs(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM runs ORDER BY run_id", self.db)

    # ---- whole networks -------------------------------------------------------------------
    def add_e2e(self, m: E2EMeasurement) -> None:
        row = m.row()
        if row["created"] is None:
            row["created"] = time.time()
        with self._tx():
            self.db.execute(f"INSERT INTO e2e ({', '.join(row)}) VALUES "
                            f"({', '.join('?' * len(row))})", list(row.values()))

    def e2e_done(self, fp_hash: str) -> set[str]:
        return {r[0] for r in self.db.execute(
            "SELECT DISTINCT case_key FROM e2e WHERE fp_hash = ?", (fp_hash,))}

    def e2e(self, fp_hash: str | None = None) -> pd.DataFrame:
        """Latest row per (identity, network case)."""
        where = "WHERE fp_hash = ?" if fp_hash else ""
        return pd.read_sql_query(
            f"SELECT * FROM e2e WHERE id IN (SELECT MAX(id) FROM e2e {where} GROUP BY fp_hash, "
            f"case_key) ORDER BY id", self.db, params=(fp_hash,) if fp_hash else ())

    # ---- tuning ------------------------------------------------------------------------------
    def add_tuning(self, row: dict) -> None:
        row = {k: (json.dumps(v, sort_keys=True) if isinstance(v, dict) else v)
               for k, v in row.items()}
        row.setdefault("created", time.time())
        with self._tx():
            self.db.execute(f"INSERT INTO tuning ({', '.join(row)}) VALUES "
                            f"({', '.join('?' * len(row))})", list(row.values()))

    def tuning(self, tune_key: str | None = None) -> pd.DataFrame:
        if tune_key is None:
            return pd.read_sql_query("SELECT * FROM tuning ORDER BY id", self.db)
        return pd.read_sql_query("SELECT * FROM tuning WHERE tune_key = ? ORDER BY id", self.db,
                                 params=(tune_key,))

    # ---- GPU leases (harness.lease): versions, ceilings, tests, compiles, step outcomes -------
    def add_lease(self, rows: list[dict]) -> None:
        with self._tx():
            for row in rows:
                row = {**row, "created": row.get("created") or time.time()}
                self.db.execute(f"INSERT INTO lease ({', '.join(row)}) VALUES "
                                f"({', '.join('?' * len(row))})", list(row.values()))

    def lease(self, run_id: int | None = None) -> pd.DataFrame:
        where, params = ("WHERE run_id = ?", (run_id,)) if run_id is not None else ("", ())
        return pd.read_sql_query(f"SELECT * FROM lease {where} ORDER BY id", self.db,
                                 params=params)

    def close(self):
        self.db.close()
