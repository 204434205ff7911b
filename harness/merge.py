"""Merge results stores (from ``--shard`` runs, other machines or a cluster) into one.

Runs are renumbered; measurements, whole-network rows and tuning records keep their identity
(the fingerprint hash and case key, or the tuning key). For the same identity and case the most
recent row wins, so a case is never duplicated. Every input is opened as a results store first:
a foreign or corrupt file is refused."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .store import Store


def _latest(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    if df.empty:
        return df
    return df.sort_values(["created", "_order"]).drop_duplicates(keys, keep="last")


def merge(inputs: list[Path], output: Path) -> dict:
    """Merge ``inputs`` into ``output`` (created, or extended when it exists); returns how many
    rows of each kind the output holds afterwards."""
    stores = [Store(p, readonly=True) for p in inputs]  # refuses foreign files before writing
    out = Store(output)
    frames = {"measurements": [], "e2e": [], "tuning": []}
    sources = [out] + stores
    for order, st in enumerate(sources):
        runs = st.runs()
        remap = {}
        if st is not out:
            for r in runs.itertuples():
                cur = out.db.execute(
                    "INSERT INTO runs (started, finished, fp_hash, machine_hash, fingerprint, "
                    "args, status) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (r.started, r.finished, r.fp_hash, r.machine_hash, r.fingerprint, r.args,
                     r.status))
                remap[r.run_id] = cur.lastrowid
        for table in frames:
            df = pd.read_sql_query(f"SELECT * FROM {table}", st.db)
            if "run_id" in df and remap:
                df["run_id"] = df["run_id"].map(remap)
            frames[table].append(df.assign(_order=order))
    keys = {"measurements": ["fp_hash", "case_key"], "e2e": ["fp_hash", "case_key"],
            "tuning": ["tune_key"]}
    counts = {}
    with out._tx():
        for table, parts in frames.items():
            df = _latest(pd.concat(parts, ignore_index=True), keys[table])
            out.db.execute(f"DELETE FROM {table}")
            df = df.drop(columns=["id", "_order"])
            if len(df):
                cols = list(df.columns)
                out.db.executemany(
                    f"INSERT INTO {table} ({', '.join(cols)}) VALUES "
                    f"({', '.join('?' * len(cols))})",
                    [tuple(None if v != v else v for v in row) for row in
                     df.astype(object).itertuples(index=False)])
            counts[table] = len(df)
    for st in stores:
        st.close()
    out.close()
    return counts
