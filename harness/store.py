"""Crash-safe results store: SQLite in WAL mode, append-only, one commit per measurement.

A killed sweep loses at most the case in flight; rerunning skips the cases already recorded for
the same fingerprint (``done_keys``). Several processes may write one file at once (WAL plus a
busy timeout). Reads take the latest row per (fingerprint, case).

An existing file is identified through a read-only connection before anything writes to it, so
a refused file (another program's, another schema) is left byte for byte as it was; commands
that only read keep that read-only connection. SQLite's failures (a corrupt page, a full disk,
a read-only place) surface as one ``StoreError`` sentence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sqlite3
import time
import urllib.parse
from pathlib import Path

import pandas as pd

from . import UsageError
from .records import (
    Confirmation,
    E2EMeasurement,
    Measurement,
    RunStatus,
    Status,
    TuningRecord,
)

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
# column -> SQL type, one per field of records.Confirmation
CONFIRMATION_COLUMNS = {f.name: _sql_type(f.type) for f in dataclasses.fields(Confirmation)}
# column -> SQL type, one per field of records.TuningRecord
TUNING_COLUMNS = {f.name: _sql_type(f.type) for f in dataclasses.fields(TuningRecord)}

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
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    {", ".join(f"{k} {v}" for k, v in TUNING_COLUMNS.items())});
CREATE INDEX IF NOT EXISTS t_key ON tuning (tune_key);
CREATE TABLE IF NOT EXISTS e2e (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    {", ".join(f"{k} {v}" for k, v in E2E_COLUMNS.items())});
CREATE INDEX IF NOT EXISTS e_case ON e2e (fp_hash, case_key);
CREATE TABLE IF NOT EXISTS confirmations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    {", ".join(f"{k} {v}" for k, v in CONFIRMATION_COLUMNS.items())});
CREATE INDEX IF NOT EXISTS c_measurement ON confirmations (measurement_id);
CREATE TABLE IF NOT EXISTS lease (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER, step INTEGER, step_name TEXT,
    kind TEXT, name TEXT, status TEXT, value REAL, unit TEXT, detail TEXT, created REAL);
"""


_STATEMENTS = [stmt.strip() for stmt in _SCHEMA.split(";") if stmt.strip()]
_TABLES = {stmt.split()[5]: stmt for stmt in _STATEMENTS if stmt.startswith("CREATE TABLE")}
SQLITE_HEADER = b"SQLite format 3\x00"


class StoreError(UsageError):
    pass


def _sqlite_words(exc: BaseException) -> str:
    """What SQLite said, without the SQL pandas wraps it in."""
    if isinstance(exc, pd.errors.DatabaseError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def explain(path, exc: BaseException) -> str:
    """One sentence for a failure of the database at ``path``: corrupt, disk full, not
    writable, or what SQLite said."""
    said = _sqlite_words(exc)
    low = said.lower()
    if isinstance(exc, UnicodeDecodeError) or any(w in low for w in (
            "malformed", "not a database", "decode", "corrupt")):
        return (f"{path} is corrupt (SQLite says: {said}); recover what it still holds into a "
                f"new file with `sqlite3 {path} .recover | sqlite3 recovered.sqlite`")
    if "full" in low:
        return f"cannot write {path}: the disk is full (SQLite says: {said})"
    if "disk i/o" in low:
        return (f"cannot write {path}: disk I/O error (a full disk or a file-size limit; "
                f"SQLite says: {said})")
    if "readonly" in low or "read-only" in low or "unable to open" in low:
        return f"cannot write {path}: it or its folder is read-only (SQLite says: {said})"
    return f"{path}: SQLite says: {said}"


_DB_ERRORS = (sqlite3.DatabaseError, pd.errors.DatabaseError, UnicodeDecodeError)


def _guarded(method):
    """A store method whose SQLite failures become one StoreError sentence."""
    @functools.wraps(method)
    def call(self, *args, **kw):
        with self.guard():
            return method(self, *args, **kw)
    return call


def _uri(path: Path, immutable: bool = False) -> str:
    return f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro" + \
        ("&immutable=1" if immutable else "")


def _open_readonly(path: Path) -> sqlite3.Connection:
    """A connection that cannot write the file (on a read-only file system, where SQLite
    cannot make the WAL's shared-memory file, an immutable one: nothing can write it there)."""
    try:
        db = sqlite3.connect(_uri(path), uri=True, timeout=60, isolation_level=None)
        db.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
        return db
    except sqlite3.OperationalError as e:
        if "unable to open" not in str(e):
            raise
    return sqlite3.connect(_uri(path, immutable=True), uri=True, isolation_level=None)


class Store:
    """The results database at ``path``. An existing file is identified (an SQLite file whose
    ``meta`` names this program and schema) through a read-only connection before anything
    writes to it; ``readonly`` keeps that connection, for commands that only read (the file is
    never switched to WAL, and no table or column is added)."""

    def __init__(self, path: str | Path, create: bool = True, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self.db = None
        with self.guard():
            if str(path) == ":memory:":
                self._connect(str(path))
                self._init(set())
                return
            if not self.path.exists():
                if not create or readonly:
                    raise StoreError(f"no results database at {self.path}; run "
                                     f"`python -m harness bench` first")
                self._make_folder()
                self._connect(str(self.path))
                self._init(self._tables())
                return
            if self.path.is_dir():
                raise StoreError(f"{self.path} is a directory, not a results database")
            tables = self._identify()
            if readonly:
                if not tables:
                    raise StoreError(f"{self.path} holds no results (an empty database); run "
                                     f"`python -m harness bench` first")
                for name in sorted(set(_TABLES) - tables):  # from an older release: empty
                    self.db.execute(_TABLES[name].replace("CREATE TABLE IF NOT EXISTS",
                                                          "CREATE TEMP TABLE"))
                return
            self.db.close()
            self._connect(str(self.path))
            self._init(self._tables())

    @contextlib.contextmanager
    def guard(self):
        """SQLite's failures (corrupt file, full disk, read-only place) as one StoreError."""
        try:
            yield
        except StoreError:
            raise
        except _DB_ERRORS as e:
            raise StoreError(explain(self.path, e)) from None

    def _make_folder(self) -> None:
        folder = self.path.parent
        for above in (folder, *folder.parents):
            if above.exists():
                if not above.is_dir():
                    raise StoreError(f"cannot create {self.path}: {above} is a file, not a "
                                     f"folder")
                break
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create {self.path}: {e.strerror} ({folder})") from None

    def _identify(self) -> set[str]:
        """Tables of the existing file at ``path`` after checking, without writing to it, that
        it is a results database of this schema (an empty file: none). Leaves the read-only
        connection in ``self.db``."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(SQLITE_HEADER))
        except OSError as e:
            raise StoreError(f"cannot read {self.path}: {e.strerror}") from None
        if head and head != SQLITE_HEADER:
            raise StoreError(f"{self.path} is not a results database (not an SQLite file)")
        if not head:
            self.db = sqlite3.connect(":memory:")
            return set()
        try:
            self.db = _open_readonly(self.path)
            tables = self._tables()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a results database (SQLite says: "
                             f"{_sqlite_words(e)})") from None
        if "meta" not in tables:
            if not tables:
                return tables  # an SQLite file with nothing in it: ours to fill
            raise StoreError(f"{self.path} is an SQLite file of another program (tables: "
                             f"{', '.join(sorted(tables))}); choose another --db")
        self._check_meta(dict(self.db.execute("SELECT key, value FROM meta")))
        return tables

    def _check_meta(self, meta: dict) -> None:
        if meta.get("app") != APP:
            raise StoreError(f"{self.path} belongs to {meta.get('app')!r}, not {APP}")
        try:
            version = int(meta.get("schema_version", 0))
        except ValueError:
            version = None
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {meta.get('schema_version')}; "
                             f"this harness reads version {SCHEMA_VERSION}")

    def _tables(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    def _connect(self, where: str) -> None:
        self.db = sqlite3.connect(where, timeout=60, isolation_level=None)
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

    def _init(self, tables):
        # one IMMEDIATE transaction: a process opening the file meanwhile sees either nothing
        # or the whole schema with its meta rows (executescript would commit table by table)
        if tables and "meta" not in tables:  # created by another program since identified
            raise StoreError(f"{self.path} is an SQLite file of another program (tables: "
                             f"{', '.join(sorted(tables))}); choose another --db")
        with self._tx():
            for stmt in _STATEMENTS:  # idempotent: also adds tables a newer release introduced
                self.db.execute(stmt)
            if not tables:
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('app', ?)", (APP,))
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                                (str(SCHEMA_VERSION),))
            self._check_meta(dict(self.db.execute("SELECT key, value FROM meta")))
            for table, columns in (("measurements", MEASUREMENT_COLUMNS), ("e2e", E2E_COLUMNS),
                                   ("tuning", TUNING_COLUMNS),
                                   ("confirmations", CONFIRMATION_COLUMNS)):
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
            if exc_type is None:
                self.db.execute("COMMIT")
                return
            try:  # SQLite may have rolled back itself (a full disk): nothing left to undo
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _tx(self):
        if self.readonly:
            raise RuntimeError(f"{self.path} was opened read-only")
        return self._Tx(self.db)

    # ---- runs -----------------------------------------------------------------------------
    @_guarded
    def start_run(self, fp: dict, fp_hash: str, machine_hash: str, args: dict) -> int:
        with self._tx():
            cur = self.db.execute(
                "INSERT INTO runs (started, fp_hash, machine_hash, fingerprint, args, status) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), fp_hash, machine_hash, json.dumps(fp, default=str),
                 json.dumps(args, default=str), RunStatus.RUNNING.value))
            return cur.lastrowid

    @_guarded
    def finish_run(self, run_id: int, status: RunStatus = RunStatus.FINISHED) -> None:
        with self._tx():
            self.db.execute("UPDATE runs SET finished = ?, status = ? WHERE run_id = ?",
                            (time.time(), RunStatus(status).value, run_id))

    def note_machine(self, fp: dict, fp_hash: str, machine_hash: str, args: dict) -> None:
        """Record a machine's fingerprint (a cluster node's) as a finished run of its own, so
        reports can name the machine behind its rows."""
        self.finish_run(self.start_run(fp, fp_hash, machine_hash, args))

    # ---- measurements --------------------------------------------------------------------
    def _insert(self, table: str, row: dict) -> None:
        """Append one row (stamped now unless it carries its time) and commit it: the unit of
        crash safety."""
        if row["created"] is None:
            row["created"] = time.time()
        with self._tx():
            self.db.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES "
                            f"({', '.join('?' * len(row))})", list(row.values()))

    @_guarded
    def add(self, m: Measurement) -> None:
        """Append one measurement and commit it."""
        if not isinstance(m, Measurement):
            raise TypeError(f"Store.add takes a records.Measurement, got {type(m).__name__}")
        self._insert("measurements", m.row())

    @_guarded
    def done_keys(self, fp_hash: str, retry_failed: bool = False) -> set[str]:
        """Cases already measured under this identity (with ``retry_failed``, only those whose
        latest measurement is ok)."""
        q = ("SELECT case_key, status FROM measurements WHERE id IN (SELECT MAX(id) FROM "
             "measurements WHERE fp_hash = ? GROUP BY case_key)")
        return {k for k, st in self.db.execute(q, (fp_hash,))
                if not retry_failed or Status(st) is Status.OK}

    @_guarded
    def measurements(self, latest: bool = True, fp_hash: str | None = None) -> pd.DataFrame:
        where = "WHERE fp_hash = ?" if fp_hash else ""
        params = (fp_hash,) if fp_hash else ()
        if latest:
            q = (f"SELECT * FROM measurements WHERE id IN (SELECT MAX(id) FROM measurements "
                 f"{where} GROUP BY fp_hash, case_key) ORDER BY id")
        else:
            q = f"SELECT * FROM measurements {where} ORDER BY id"
        df = pd.read_sql_query(q, self.db, params=params)
        return self._with_confirmations(df)

    def _with_confirmations(self, df: pd.DataFrame) -> pd.DataFrame:
        """The rows with their latest confirmation (``harness.confirm``) beside them, as
        ``conf_*`` columns (empty where a row was not raced)."""
        cols = [c for c in CONFIRMATION_COLUMNS if c not in ("measurement_id", "case_key",
                                                             "fp_hash")]
        conf = pd.read_sql_query(  # always there: created, or a TEMP one for an older file
            "SELECT * FROM confirmations WHERE id IN (SELECT MAX(id) FROM confirmations GROUP "
            "BY measurement_id)", self.db)
        if conf.empty:
            for c in cols:
                df["conf_" + c] = pd.Series([None] * len(df), index=df.index, dtype=object)
            return df
        conf = conf.set_index("measurement_id")[cols].add_prefix("conf_")
        return df.join(conf, on="id")

    @_guarded
    def add_confirmation(self, c: Confirmation) -> None:
        """Append one confirmation row and commit it."""
        self._insert("confirmations", c.row())

    @_guarded
    def runs(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM runs ORDER BY run_id", self.db)

    # ---- whole networks -------------------------------------------------------------------
    @_guarded
    def add_e2e(self, m: E2EMeasurement) -> None:
        self._insert("e2e", m.row())

    @_guarded
    def e2e_done(self, fp_hash: str) -> set[str]:
        return {r[0] for r in self.db.execute(
            "SELECT DISTINCT case_key FROM e2e WHERE fp_hash = ?", (fp_hash,))}

    @_guarded
    def e2e(self, fp_hash: str | None = None) -> pd.DataFrame:
        """Latest row per (identity, network case)."""
        where = "WHERE fp_hash = ?" if fp_hash else ""
        df = pd.read_sql_query(
            f"SELECT * FROM e2e WHERE id IN (SELECT MAX(id) FROM e2e {where} GROUP BY fp_hash, "
            f"case_key) ORDER BY id", self.db, params=(fp_hash,) if fp_hash else ())
        # a database written before a column was added, opened read-only, lacks it: empty
        missing = [c for c in E2E_COLUMNS if c not in df.columns]
        return df.assign(**dict.fromkeys(missing)) if missing else df

    # ---- tuning ------------------------------------------------------------------------------
    @_guarded
    def add_tuning(self, record: TuningRecord) -> None:
        self._insert("tuning", dataclasses.asdict(record))

    @_guarded
    def tuning(self) -> pd.DataFrame:
        """The tuning table, oldest first, as a frame."""
        return pd.read_sql_query("SELECT * FROM tuning ORDER BY id", self.db)

    def _tuning_records(self, where: str = "", params=(), last: str = "ORDER BY id"
                        ) -> list[TuningRecord]:
        cols = ", ".join(TUNING_COLUMNS)
        return [TuningRecord(*r) for r in self.db.execute(
            f"SELECT {cols} FROM tuning {where} {last}", params)]

    @_guarded
    def tuning_records(self, shape: str | None = None) -> list[TuningRecord]:
        """Every tuning record (or those of one layer shape), oldest first."""
        return self._tuning_records(*(("WHERE shape = ?", (shape,)) if shape else ()))

    @_guarded
    def latest_tuning(self, tune_key: str) -> TuningRecord | None:
        """The newest record of one tuning key, or None."""
        found = self._tuning_records("WHERE tune_key = ?", (tune_key,), "ORDER BY id DESC LIMIT 1")
        return found[0] if found else None

    @_guarded
    def tuned_elsewhere(self, kernel: str, shape: str, sparsity: float, batch: int,
                        dtype: str) -> TuningRecord | None:
        """A record of the same kernel, shape, sparsity, batch and dtype, whatever its identity
        and source (the tuner says why such a record is not reused), or None."""
        found = self._tuning_records(
            "WHERE kernel = ? AND shape = ? AND sparsity = ? AND batch = ? AND dtype = ?",
            (kernel, shape, sparsity, batch, dtype), "ORDER BY id LIMIT 1")
        return found[0] if found else None

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
