"""The package's structure, drawn from its imports: floors from the entry points down to the kernels, no import
from a lower floor to a higher one, no import cycle, small files."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "pagedllm"

# top to bottom; a module may import its own floor and any floor below it
FLOORS = [
    ("entrypoints", "benchmarks"),
    ("engine",),
    ("executor",),
    ("worker",),
    ("model_loader",),
    ("models",),
    ("layers",),
    ("distributed",),
    ("kernels",),
    # neutral: data types and facts shared along the whole line; they import nothing above them
    ("config", "quant_config", "spec_config", "step", "forward_context", "sampling_params", "outputs", "platform", "memory"),
]
FLOOR = {package: i for i, packages in enumerate(FLOORS) for package in packages}
MAX_LINES = 300


def _module(path: pathlib.Path) -> str:
    return ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """module -> the pagedllm modules it imports (at any depth of its code, lazy imports included)."""
    paths = list(ROOT.rglob("*.py"))
    modules = {_module(p) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pagedllm"):
                # `from pagedllm.x import y` imports the module x.y where there is one, else names of x
                targets.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                               for a in node.names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("pagedllm"))
        graph[_module(path)] = targets - {_module(path)}
    return graph


def _floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOOR.get(parts[1]) if len(parts) > 1 else None  # the package root re-exports the public API


def test_every_module_has_a_floor():
    assert {m for m in _imports() if m != "pagedllm" and _floor(m) is None} == set()


def test_no_import_runs_upward():
    upward = [f"{a} -> {b}" for a, targets in _imports().items() for b in targets
              if _floor(a) is not None and _floor(b) is not None and _floor(b) < _floor(a)]
    assert upward == []


def test_no_import_cycle():
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == 1:
                return path + [module, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [module])):
                return cycle
        state[module] = 2
        return None

    cycles = [c for m in sorted(graph) if m not in state and (c := visit(m, []))]
    assert cycles == []


def test_files_stay_small():
    assert [str(p) for p in ROOT.rglob("*.py") if len(p.read_text().splitlines()) > MAX_LINES] == []
