"""What the lease runs as child processes: the environment a child gets (the checkout
importable), a run cut off at a deadline, and the test outcomes read from pytest's output."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def pytest_results(text: str) -> list[dict]:
    """Test outcomes from ``pytest -v`` output, with or without xdist: one row per test. A test
    id's parameters may hold spaces (``test_x[16->32 3x3 s2 ...]``): the id runs to its closing
    bracket, so two parametrizations that share a first word are two tests."""
    rows = {}
    pat = re.compile(r"(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")
    for line in text.splitlines():
        node = re.search(r"(tests/\S+::[^\s\[]+(?:\[[^\]]*\])?)", line)
        status = pat.search(line)
        if node and status:
            rows[node.group(1)] = status.group(1).lower()
    return [{"kind": "test", "name": k, "status": v} for k, v in rows.items()]


def run_capped(cmd, env: dict, until: float, log_file: Path) -> tuple[int | None, str]:
    """Run ``cmd`` until it ends or ``until`` (``time.monotonic``): (exit code or None when it
    was stopped, its output)."""
    with open(log_file, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            import signal

            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
    return rc, Path(log_file).read_text(errors="replace")


def child_env(**changes) -> dict:
    """This process's environment with the checkout importable and ``changes`` applied (a
    value of None removes the variable)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    for k, v in changes.items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return e
