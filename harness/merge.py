"""Merge results stores (from ``--shard`` runs, other machines or a cluster) into one.

Runs are renumbered; measurements, whole-network rows and tuning records keep their identity
(the fingerprint hash and case key, or the tuning key). For the same identity and case the most
recent row wins, so a case is never duplicated; a confirmation (``harness.confirm``) follows the
measurement row it raced, and goes with it where a newer row of the same case wins. Every input
is opened read-only as a results store and read whole before the output is touched: a foreign
or corrupt file is refused. The output changes all at once or not at all: an existing one in
one transaction, a new one written under a temporary name and renamed into place."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .store import Store, StoreError

TABLES = {"measurements": ["fp_hash", "case_key"], "e2e": ["fp_hash", "case_key"],
          "tuning": ["tune_key"]}


def _latest(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    if df.empty:
        return df
    return df.sort_values(["created", "_order"]).drop_duplicates(keys, keep="last")


def _read(store: Store) -> dict:
    """Every row of a store: its runs and its tables."""
    with store.guard():
        return {"runs": store.runs(), **{t: pd.read_sql_query(f"SELECT * FROM {t}", store.db)
                                          for t in (*TABLES, "confirmations")}}


def merge(inputs: list[Path], output: Path) -> dict:
    """Merge ``inputs`` into ``output`` (created, or extended when it exists); returns how many
    rows of each kind the output holds afterwards."""
    contents = []
    for p in inputs:  # refuses foreign and corrupt files before anything is written
        st = Store(p, readonly=True)
        try:
            contents.append(_read(st))
        finally:
            st.close()
    output = Path(output)
    if output.exists():
        return _merge_into(Store(output), contents)
    tmp = output.with_name(f".{output.name}.merging-{os.getpid()}")
    try:
        try:
            counts = _merge_into(Store(tmp), contents)
        except StoreError as e:  # name the file the user asked for, not the temporary one
            raise StoreError(str(e).replace(str(tmp), str(output))) from None
        os.replace(tmp, output)
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            if leftover.exists():
                leftover.unlink()
    return counts


def _merge_into(out: Store, contents: list[dict]) -> dict:
    """One transaction: the output's own rows and every input's, the latest row per case."""
    counts = {}
    try:
        with out.guard(), out._tx():
            frames = {t: [] for t in (*TABLES, "confirmations")}
            mine = _read(out)
            for table in frames:
                frames[table].append(mine[table].assign(_order=0))
            for order, part in enumerate(contents, 1):
                remap = {}
                runs = part["runs"]
                cols = [c for c in runs.columns if c != "run_id"]  # renumbered here
                for run_id, values in zip(runs["run_id"], runs[cols].astype(object).itertuples(
                        index=False)):
                    cur = out.db.execute(
                        f"INSERT INTO runs ({', '.join(cols)}) VALUES "
                        f"({', '.join('?' * len(cols))})",
                        tuple(None if v != v else v for v in values))
                    remap[run_id] = cur.lastrowid
                for table in frames:
                    df = part[table]
                    if "run_id" in df and remap:
                        df = df.assign(run_id=df["run_id"].map(remap))
                    frames[table].append(df.assign(_order=order))
            kept = None  # the measurement rows that won: (input, old id) -> their new id
            for table in TABLES:
                df = _latest(pd.concat(frames[table], ignore_index=True), TABLES[table])
                if table == "measurements":
                    kept = df[["_order", "id", "fp_hash", "case_key"]]
                counts[table] = _replace(out, table, df.drop(columns=["id", "_order"]))
            new = pd.read_sql_query("SELECT id AS new_id, fp_hash, case_key FROM measurements",
                                    out.db)
            kept = kept.merge(new, on=["fp_hash", "case_key"])
            conf = pd.concat(frames["confirmations"], ignore_index=True)
            conf = conf.merge(kept[["_order", "id", "new_id"]].rename(
                columns={"id": "measurement_id"}), on=["_order", "measurement_id"])
            conf = conf.assign(measurement_id=conf.new_id).sort_values(["created", "_order"])
            counts["confirmations"] = _replace(out, "confirmations", conf.drop(
                columns=["id", "_order", "new_id"]))
    finally:
        out.close()
    return counts


def _replace(out: Store, table: str, df: pd.DataFrame) -> int:
    """``table``'s rows become ``df``'s (inside the caller's transaction)."""
    out.db.execute(f"DELETE FROM {table}")
    if len(df):
        cols = list(df.columns)
        out.db.executemany(
            f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [tuple(None if v != v else v for v in row)
             for row in df.astype(object).itertuples(index=False)])
    return len(df)
