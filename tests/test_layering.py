"""How the harness is put together: imports run one way, and the gate owns the relative error."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "kernels", "shapes")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (top level, inside functions,
    under ``if TYPE_CHECKING``): ``from pkg import mod`` leads to ``pkg.mod`` when that is a
    module, else to ``pkg`` itself."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - (node.level - 1)] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # import a.b.c names module a.b.c, or a.b, or a
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _cycle(graph: dict) -> list[str] | None:
    """One import cycle of ``graph`` (a list that starts and ends with the same module), or
    None."""
    state: dict = {}
    stack: list = []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_function_level_import_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_imports_follow_function_level_and_relative_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from . import worker\n\ndef f():\n    from .e2e import run\n    import kernels\n")
    mods = {"harness": None, "harness.m": f, "harness.worker": None, "harness.e2e": None,
            "kernels": None}
    assert _imports("harness.m", f, mods) == {"harness.worker", "harness.e2e", "kernels"}


def test_no_module_of_the_project_imports_itself_back():
    """Following every import of harness/, kernels/ and shapes/ (function-level ones too) never
    leads back to where it started: imports run one way (CLI -> drivers -> executor -> worker ->
    gate and timing -> kernels -> patterns)."""
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_relative_error_goes_through_the_gate(monkeypatch):
    """The case gate, e2e's network gate and the CUDA-graph replay check all measure relative
    error with ``harness.gate.relative_error``: patch it and each of them calls it."""
    import kernels
    from harness import gate, timing
    from shapes import ConvLayer

    calls = []
    real = gate.relative_error

    def spy(got, want):
        calls.append("called")
        return real(got, want)

    monkeypatch.setattr(gate, "relative_error", spy)

    # the case gate
    lay = ConvLayer(net="t", name="c", index=0, cin=8, cout=8, kh=3, kw=3, stride=1,
                    padding=1, h=6, w=6)
    k = kernels.get("dense_cpu")
    w, x = gate.make_inputs(lay, 1, torch.float32, "cpu")
    run = k.prepare(lay, w, 0.0, k.full_config(lay, 0.0))
    assert gate.check_correct(lay, k, run, x, 0.0, k.full_config(lay, 0.0), "float32").reason \
        is None
    assert calls, "the case gate did not use gate.relative_error"

    # e2e's network gate
    calls.clear()
    net = torch.nn.Conv2d(3, 4, 3)
    xin = torch.rand(1, 3, 8, 8)
    want = torch.nn.functional.conv2d(xin.double(), net.weight.double(), net.bias.double())
    with torch.inference_mode():
        got = gate.check_network({"sparse": net}, xin, want, 1e-4)
    assert got.reason is None and got.rel_err < 1e-5
    assert calls, "e2e's network gate did not use gate.relative_error"

    # the CUDA-graph replay check (the capture itself needs a GPU: stood in for here)
    calls.clear()
    out = torch.empty(3)
    monkeypatch.setattr(timing, "graphed", lambda fn, arg: (lambda _a: out.copy_(fn(arg)), out))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    timing.checked_graph(lambda a: a * 2, torch.ones(3), torch.full((3,), 2.0))
    assert calls, "the graph-replay check did not use gate.relative_error"


def test_the_gate_s_relative_error_matches_an_independent_float64_reference():
    g = torch.Generator().manual_seed(0)
    want = torch.randn(40, generator=g, dtype=torch.float64)
    got = (want + 1e-3 * torch.randn(40, generator=g, dtype=torch.float64)).float()
    from harness import gate

    diff = [float(a) - float(b) for a, b in zip(got.tolist(), want.tolist())]
    ref = (sum(d * d for d in diff) / sum(float(b) ** 2 for b in want.tolist())) ** 0.5
    assert gate.relative_error(got, want) == pytest.approx(ref, rel=1e-6)
