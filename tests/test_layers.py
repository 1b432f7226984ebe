"""The layer order: every import (module level or inside a function) points down the list, and no two modules or
packages import each other, directly or round a longer loop. Configs and the pipeline stay torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Top to bottom: a package may import the ones below it, never one above. Packages on one line are peers and may not
# import each other.
LAYERS = [
    ["benchmarks"],
    ["cli"],
    ["kfp"],
    ["pipelines"],
    ["components"],
    ["experiments"],
    ["launch"],
    ["stages"],
    ["tracking"],
    ["evaluation"],
    ["training"],
    ["rollout"],
    ["models"],
    ["config"],
    ["tasks"],
    ["method"],
    ["io"],
    ["errors"],
]
SOURCES = {"caopd": ROOT / "src" / "caopd", "caopd.components": ROOT / "components",
           "caopd.pipelines": ROOT / "pipelines", "benchmarks": ROOT / "benchmarks"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if package == "caopd" and parts[:1] in (["components"], ["pipelines"]):
                continue
            found[name] = path
    return found


MODULES = _modules()


def _target(name: str) -> str | None:
    """The project module an imported name resolves to: the longest known prefix."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in map(_target, targets):
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def layer_of(module: str) -> int | None:
    """Index into LAYERS (0 = top); None for the package root (caopd/__init__: the version only)."""
    parts = module.split(".")
    if parts[0] == "benchmarks":
        return 0
    if len(parts) < 2:
        return None
    for index, peers in enumerate(LAYERS):
        if parts[1] in peers:
            return index
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                found.append(sorted(members))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _package(module: str) -> str:
    """caopd.training.trainer -> caopd.training; benchmarks.cases -> benchmarks."""
    parts = module.split(".")
    return ".".join(parts[:1] if parts[0] == "benchmarks" else parts[:2])


def test_every_import_points_down_the_layers():
    upward = []
    for module, targets in import_graph().items():
        mine = layer_of(module)
        for target in targets:
            theirs = layer_of(target)
            if mine is None or theirs is None or _package(module) == _package(target):
                continue
            if theirs <= mine:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point up (or across) the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycle_between_modules():
    assert cycles(import_graph()) == []


def test_no_import_cycle_between_packages():
    packages: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        packages.setdefault(_package(module), set()).update(map(_package, targets))
    for package, targets in packages.items():
        targets.discard(package)
    assert cycles(packages) == []


def test_the_cycle_finder_sees_a_loop_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("code", [
    "import caopd.pipelines",
    "from caopd.cli import build_parser; build_parser()",
    "import caopd.config.stages, caopd.config.experiments, caopd.config.run, caopd.config.pretrain",
])
def test_configs_the_cli_parser_and_the_pipeline_do_not_load_torch(code):
    probe = f"import sys; {code}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
