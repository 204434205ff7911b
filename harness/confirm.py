"""The confirmation pass that ends a sweep: a best configuration is a maximum over sweep rows,
and a maximum picks up lucky rows (a dense run slowed by something else, one quiet moment). Per
layer, pattern and sparsity, the sweep's best and runner-up configuration race the dense
baseline (both its end-to-end and its kernel-only layout) interleaved in one more timing, the
race the autotuner confirms its picks with (``measure.race``). The race's figures, with their
intervals, are stored as ``Confirmation`` rows beside the sweep rows they confirm; every best
figure (``analysis.best_per_layer``) takes them instead of the sweep's, and a pair whose
intervals overlap is reported as a tie, not ranked."""

from __future__ import annotations

import dataclasses
import statistics

import pandas as pd

from . import analysis, baseline
from .execute import DECLINE
from .measure import PLAUSIBLE
from .records import Candidate, Config, Confirmation, RaceReply, RaceRequest, Status
from .runner import progress_bar
from .timing import MIN_INTERVAL_ROUNDS, ratio_interval

TOP = 2  # the best configuration and its runner-up
SLOT = analysis.GROUP + ["layer", "pattern", "sparsity"]


def pending(df: pd.DataFrame, keys=None) -> list[pd.DataFrame]:
    """Per layer, pattern and sparsity (among the ``keys`` cases, if given): the top ``TOP``
    ok, unflagged sparse rows by end-to-end speedup, where those rows are not confirmed yet
    (a row confirmed earlier, the same measurement, is not raced again)."""
    ok = df[(df.pattern != "dense") & (df.status == Status.OK) & ~analysis.flagged(df)
            & df.dense_median_s.notna()]
    if keys is not None:
        ok = ok[ok.case_key.isin(keys)]
    if ok.empty:
        return []
    ok = analysis.with_speedups(ok)
    out = []
    for _, g in ok.groupby(SLOT):
        top = g.sort_values("speedup", ascending=False).head(TOP)
        if "conf_rank" in top and top.conf_rank.notna().all():
            continue
        out.append(top)
    return out


def _ratio(num, den):
    if not num or not den:
        return None, None, None
    lo, hi = ratio_interval(num, den)
    return statistics.median(num) / statistics.median(den), lo, hi


def _dense_layouts(row) -> tuple[str, str]:
    e2e, _, res = str(row.dense_layout).partition("/")
    return e2e, res or e2e


def confirmations(top: pd.DataFrame, reply: RaceReply, run_id: int, ideal: float,
                  resident_at: int) -> list[Confirmation]:
    """The stored rows of one race: candidate 0 is dense in its end-to-end layout, candidate
    ``resident_at`` dense in its kernel-only layout, the sparse candidates follow in ``top``'s
    order."""
    dense = reply.samples[0]
    dense_k = reply.resident_samples[resident_at] if reply.resident_samples else ()
    first = len(reply.samples) - len(top)
    out = []
    for j, r in enumerate(top.itertuples()):
        i = first + j
        mine = reply.samples[i]
        why = reply.reasons[i] or (None if mine else "not timed")
        sp = _ratio(dense, mine)
        # kernel-only: as the sweep, a kernel without a resident run counts its end-to-end one
        ksp = _ratio(dense_k, (reply.resident_samples[i] if reply.resident_samples else ())
                     or mine)
        others = [reply.samples[first + o] for o in range(len(top)) if o != j]
        vs = _ratio(others[0], mine) if others and others[0] else (None, None, None)
        high = [f"{what} {v:.2f}x" for what, v in (("end to end", sp[0]),
                                                   ("kernel-only", ksp[0]))
                if v is not None and v > PLAUSIBLE * ideal]
        out.append(Confirmation(
            measurement_id=int(r.id), case_key=r.case_key, fp_hash=r.fp_hash, run_id=run_id,
            rank=j + 1, median_s=statistics.median(mine) if mine else None,
            dense_median_s=statistics.median(dense) if dense else None,
            speedup=sp[0], speedup_lo=sp[1], speedup_hi=sp[2],
            kernel_speedup=ksp[0], kernel_speedup_lo=ksp[1], kernel_speedup_hi=ksp[2],
            vs_other=vs[0], vs_other_lo=vs[1], vs_other_hi=vs[2],
            contention=reply.contention, contended=bool(reply.contended),
            implausible=(f"{' and '.join(high)} above the FLOP ideal {ideal:.2f}x in the "
                         f"confirmation race too") if high else None,
            reason=why))
    return out


def run(df: pd.DataFrame, cases: dict, store, run_id: int, timing, executor, *,
        case_timeout: float, progress: bool = True) -> dict:
    """Race every pending slot (``pending``) on ``executor`` and store the confirmations as
    they arrive; a slot is raced only on a node of the identity its rows were measured under
    (``df`` holds that identity's rows); ``cases``: case key -> Case (the sweep's). Ctrl-C
    stops after the race in flight; the slots not raced stay unconfirmed. Returns counts
    (empty where nothing was pending)."""
    slots = pending(df, keys=set(cases))
    if not slots:
        return {}
    counts = {"raced": 0, "held": 0, "overtaken": 0, "tied": 0, "flagged": 0, "not timed": 0,
              "not raced (stopped)": 0, "not raced (no node of its machine kind)": 0}
    opts = dataclasses.replace(timing, rounds=max(timing.rounds, MIN_INTERVAL_ROUNDS))
    bar = progress_bar(len(slots), progress, desc="confirm", unit="race")

    def call(info, top):
        if top.iloc[0].fp_hash != info.identity:  # measured on another kind of machine
            return DECLINE
        case = cases[top.iloc[0].case_key]
        dense_k = baseline.kernel_for(case.device).name
        e2e, res = _dense_layouts(top.iloc[0])
        cands = [Candidate(dense_k, Config({baseline.LAYOUT: e2e}))]
        if res != e2e:
            cands.append(Candidate(dense_k, Config({baseline.LAYOUT: res})))
        cands += [Candidate(cases[k].kernel, cases[k].config) for k in top.case_key]
        bar.set_postfix_str(f"{case.layer.net}:{case.layer.name} {case.pattern} "
                            f"S={case.sparsity:g}", refresh=False)
        return "race", (RaceRequest(layer=case.layer, batch=case.batch, dtype=case.dtype,
                                    device=case.device, threads=case.threads,
                                    sparsity=case.sparsity, cands=tuple(cands), timing=opts,
                                    resident=True), case_timeout * 2)

    def done(info, top, reply):
        sparsity = cases[top.iloc[0].case_key].sparsity
        if not isinstance(reply, RaceReply) or not reply.samples or not reply.samples[0]:
            why = reply if isinstance(reply, str) else (
                f"the dense baseline failed in the race: {reply.reasons[0]}"
                if isinstance(reply, RaceReply) else "the worker failed")
            counts["not timed"] += 1
            for j, r in enumerate(top.itertuples()):
                store.add_confirmation(Confirmation(
                    measurement_id=int(r.id), case_key=r.case_key, fp_hash=r.fp_hash,
                    run_id=run_id, rank=j + 1, reason=why))
        else:
            n_dense = len(reply.samples) - len(top)
            rows = confirmations(top, reply, run_id, 1 / (1 - sparsity), resident_at=n_dense - 1)
            for c in rows:
                store.add_confirmation(c)
            counts["raced"] += 1
            counts[verdict(rows)] += 1
        bar.update(1)

    def lost(info, top):  # no node of its kind (left): the slot keeps its sweep figures
        counts["not raced (no node of its machine kind)"] += 1
        bar.update(1)

    try:
        counts["not raced (stopped)"] = len(executor.run(slots, call, done, lost))
    finally:
        bar.close()
    return counts


def verdict(rows: list[Confirmation]) -> str:
    """What one race said: 'flagged' (the sweep's best is contended, implausible or not timed in
    the race), 'tied' (the two intervals overlap), 'held' (the sweep's best is the faster),
    'overtaken' (the runner-up is)."""
    best = rows[0]
    if best.reason or best.contended or best.implausible:
        return "flagged"
    if len(rows) < 2 or rows[1].reason:
        return "held"
    if best.vs_other_lo is None or best.vs_other_lo <= 1 <= best.vs_other_hi:
        return "tied"
    return "held" if best.vs_other > 1 else "overtaken"


def summary(counts: dict) -> str | None:
    """One line on a confirmation pass."""
    if not any(counts.values()):
        return None
    stopped = counts.get("not raced (stopped)", 0)
    return (f"confirmation: {counts['raced']} layer/pattern/sparsity best(s) raced against "
            f"dense with their runner-up: {counts['held']} held, {counts['overtaken']} overtaken "
            f"by the runner-up, {counts['tied']} tied (intervals overlap), {counts['flagged']} "
            f"flagged in the race, {counts['not timed']} not timed"
            + (f", {stopped} not raced (stopped)" if stopped else "")
            + (f", {nobody} not raced (no node of their machine kind)"
               if (nobody := counts.get("not raced (no node of its machine kind)", 0)) else "")
            + "; best figures are the race's")
