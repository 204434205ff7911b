"""Sessions: tests, lint, bench (the main job), e2e, gpu (the GPU lease), autotune, report, perf, verify.

Virtualenvs see the system site-packages so a CUDA machine's own torch is kept; where no torch is
importable, the CPU build (torch==2.13.0) is installed first unless an NVIDIA driver is present.
Tools run as ``python -m TOOL`` with the session's own interpreter: a bare ``pytest`` could be
the system's copy, which cannot import the venv's torch.
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


PEERS = "peers,deepsparse"  # the whole-network engines (deepsparse only where wheels exist)


def peers_expected() -> str:
    """The engines ``PEERS`` installs on this Python, for the tests: there a missing one fails
    its test instead of being skipped."""
    import sys

    return "onnxruntime,openvino" + (",deepsparse" if sys.version_info < (3, 12) else "")


def install(session, extras: str = "test") -> None:
    if session.venv_backend == "none":
        return
    has_torch = subprocess.run([_python(session), "-c", "import torch"],
                               capture_output=True).returncode == 0
    if not has_torch:
        # a bare `pip install torch` pulls a multi-GB CUDA build; only do that where CUDA is.
        session.install("torch" if shutil.which("nvidia-smi") else "torch==2.13.0")
    session.install("-e", f".[{extras}]")


BROWSERS = ("chromium", "chromium-browser", "google-chrome")  # tests/test_report.py looks too


def chromium() -> str | None:
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    return None


def ensure_browser(session) -> None:
    """The report's browser test needs a Chromium. Where none is found: Debian's package when
    we are root (or have passwordless sudo), else playwright's own download. Set
    SPARSECONV_NO_BROWSER=1 to skip that test deliberately instead."""
    if os.environ.get("SPARSECONV_NO_BROWSER") == "1" or chromium():
        return
    apt = shutil.which("apt-get")
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if apt and sudo is not None:
        session.log("no Chromium found: installing Debian's chromium for the report's browser test")
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        try:
            session.run(*sudo, apt, "update", "-qq", external=True, env=env)
            session.run(*sudo, apt, "install", "-y", "-qq", "chromium", external=True, env=env)
        except nox.command.CommandFailed:
            session.log("apt-get could not install chromium (no root or password-less sudo)")
        if chromium():
            return
    session.log("no Chromium found: asking playwright to download its own")
    session.run("python", "-m", "playwright", "install", "chromium")


@nox.session(venv_params=VENV)
def tests(session):
    """The test suite (correctness of every kernel, patterns, harness, reports), without the
    tests marked slow (the full kernel grids, the Ray cluster, the source-edit runs): those run
    with `nox -s tests -- -m slow`, as CI does. Any pytest arguments may follow `--`.

    Test files run in parallel, one process per core up to 4 (pytest-xdist, a file's tests
    together so its shared fixtures are built once): most tests wait on a command's worker
    process, and no test reads the machine's real timing. `-n 0` runs them one at a time."""
    install(session, f"test,report-test,ray,{PEERS}")
    ensure_browser(session)
    args = list(session.posargs)
    if not any(a == "-m" or a.startswith("-m") and not a.startswith("--") for a in args):
        args = ["-m", "not slow and not perf", *args]
    if not any(a == "-n" or a.startswith(("-n", "--numprocesses")) for a in args):
        args = ["-n", str(min(os.cpu_count() or 1, 4)), "--dist", "loadfile", *args]
    session.run("python", "-m", "pytest", *args, env={"SPARSECONV_PEERS": peers_expected()})


@nox.session(venv_params=VENV)
def lint(session):
    session.install("ruff>=0.4")
    session.run("python", "-m", "ruff", "check", ".")


@nox.session(venv_params=VENV)
def bench(session):
    """Main job: sweep ResNet50 and VGG19 over every CPU kernel and sparsity, then report.
    Pass `-- --quick` for the few-minute version, or any `python -m harness bench` flags."""
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


E2E_NETS = ("resnet50", "resnet18", "vgg19")
E2E_PATTERNS = ("cs", "1xn")
PLAN_CHECK = """
import sys
from pathlib import Path
from harness import env
from harness.cli.e2e import choose_plan
from harness.records import Device
fp = env.fingerprint()
plan, _, said = choose_plan(Path(sys.argv[1]), sys.argv[2], sys.argv[3], 0.9375, 1,
                            env.identity_hash(fp), Device.CPU)
print("usable" if plan is not None else said)
"""


@nox.session(venv_params=VENV)
def e2e(session):
    """Whole networks, sparse against dense, measured end to end: ResNet50, ResNet18 and VGG19
    at 93.75% with CS and 1xN, batch 1 and 8, and VGG19 at batch 1 with its classifier
    sparsified too. Every run times, beside the sparse network, the dense engines a person could
    deploy (PyTorch eager, ONNX Runtime, OpenVINO, DeepSparse) and DeepSparse on the very same
    masks; each is also timed alone in its own process. Where no usable plan exists for batch 1
    an autotune with a one-minute budget per net and pattern writes one first (later runs reuse
    the tuning table and the plan); batch 8 uses each layer's default configuration. Extra
    arguments go to every `harness e2e` call."""
    install(session, f"test,{PEERS}")
    plans = "results/plans"
    for net in E2E_NETS:
        for pattern in E2E_PATTERNS:
            # a plan is used only if e2e would accept it (same machine, software and kernel
            # sources); a missing or stale one is tuned again
            said = session.run("python", "-c", PLAN_CHECK, plans, net, pattern, silent=True)
            if said.strip().splitlines()[-1] != "usable":
                session.log(said.strip().splitlines()[-1])
                session.run("python", "-m", "harness", "autotune", "--net", net, "--patterns",
                            pattern, "--sparsity", "0.9375", "--strategy", "model",
                            "--time-budget", "60", "--out-dir", plans)
    for batch in ("1", "8"):
        session.run("python", "-m", "harness", "e2e", "--nets", ",".join(E2E_NETS),
                    "--patterns", ",".join(E2E_PATTERNS), "--sparsities", "0.9375",
                    "--batch", batch, "--plans", plans, *session.posargs)
    # VGG19's dense classifier reads ~0.5 GB per image: measured again with it sparse too
    session.run("python", "-m", "harness", "e2e", "--nets", "vgg19", "--patterns",
                ",".join(E2E_PATTERNS), "--sparsities", "0.9375", "--classifier",
                "--plans", plans, *session.posargs)
    session.run("python", "-m", "harness", "report")


@nox.session(venv_params=VENV)
def gpu(session):
    """On a machine with an NVIDIA GPU: the GPU lease programme, `python -m harness lease`
    (versions and measured ceilings, the Triton tests on the GPU, every launch compiled, the
    paper's layers against cuDNN and the Triton control in fp32 and fp16, a batch-64 tuning,
    ResNet50 end to end eager and in CUDA graphs) into results/lease/, then the report from its
    database. Extra arguments go to the lease (e.g. `-- --deadline 900`). A bare lease machine
    without nox runs the same command: `PYTHONPATH=. python3 -m harness lease --out DIR`."""
    install(session, "test")
    args = list(session.posargs)
    out = "results/lease"
    for i, a in enumerate(args):
        if a == "--out" and i + 1 < len(args):
            out = args[i + 1]
        elif a.startswith("--out="):
            out = a.split("=", 1)[1]
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args = ["--out", out, *args]
    session.run("python", "-m", "harness", "lease", *args)
    session.run("python", "-m", "harness", "report", "--db", f"{out}/lease.sqlite")


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
    session.run("python", "-m", "pytest", "tests/perf", "-m", "perf", "--benchmark-enable",
                "--benchmark-autosave", "--benchmark-compare", "--benchmark-compare-fail=median:25%",
                *session.posargs, success_codes=[0, 5])
