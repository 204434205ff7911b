"""Sessions: tests, lint, bench (the main job), autotune, report, perf, verify.

Virtualenvs see the system site-packages so a CUDA machine's own torch is kept; where no torch is
importable, the CPU build (torch==2.13.0) is installed first unless an NVIDIA driver is present.
"""

import os
import shutil
import subprocess

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_venv = "yes"
VENV = ["--system-site-packages"]


def _python(session) -> str:
    return os.path.join(session.bin, "python")


def install(session, extras: str = "test") -> None:
    if session.venv_backend == "none":
        return
    has_torch = subprocess.run([_python(session), "-c", "import torch"],
                               capture_output=True).returncode == 0
    if not has_torch:
        # a bare `pip install torch` pulls a multi-GB CUDA build; only do that where CUDA is.
        session.install("torch" if shutil.which("nvidia-smi") else "torch==2.13.0")
    session.install("-e", f".[{extras}]")


@nox.session(venv_params=VENV)
def tests(session):
    """The test suite (correctness of every kernel, patterns, harness, reports)."""
    install(session, "test,report-test")
    session.run("pytest", *session.posargs)


@nox.session(venv_params=VENV)
def lint(session):
    session.install("ruff>=0.4")
    session.run("ruff", "check", ".")


@nox.session(venv_params=VENV)
def bench(session):
    """Main job: sweep ResNet50 and VGG19 over every CPU kernel and sparsity, then report.
    Pass `-- --quick` for the one-minute version, or any `python -m harness bench` flags."""
    install(session, "test")
    args = session.posargs or []
    session.run("python", "-m", "harness", "bench", *args)
    report = []
    for i, a in enumerate(args):  # the report reads the database the sweep wrote
        if a == "--db" and i + 1 < len(args):
            report = ["--db", args[i + 1]]
        elif a.startswith("--db="):
            report = ["--db", a.split("=", 1)[1]]
    session.run("python", "-m", "harness", "report", *report)


@nox.session(venv_params=VENV)
def autotune(session):
    """Tune ResNet50 at 93.75% CS on this machine and write a deployable plan."""
    install(session, "test")
    args = session.posargs or ["--net", "resnet50", "--patterns", "cs", "--sparsity", "0.9375"]
    session.run("python", "-m", "harness", "autotune", *args)


@nox.session(venv_params=VENV)
def report(session):
    install(session, "test")
    session.run("python", "-m", "harness", "report", *session.posargs)


@nox.session(venv_params=VENV)
def verify(session):
    """Correctness of every kernel (no timing); `-- --compile` adds the Triton AOT compile."""
    install(session, "test")
    session.run("python", "-m", "harness", "verify", *session.posargs)


@nox.session(venv_params=VENV)
def perf(session):
    """pytest-benchmark regression suite: saves a baseline and compares against the last one."""
    install(session, "test")
    session.run("pytest", "tests/perf", "-m", "perf", "--benchmark-enable",
                "--benchmark-autosave", "--benchmark-compare", "--benchmark-compare-fail=median:25%",
                *session.posargs, success_codes=[0, 5])
