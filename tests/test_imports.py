"""The package's shape, read from the source with ``ast`` (nothing is imported): the data and models walls, no
import cycle, and a package top that holds only CLIs and the cross-cutting modules."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "nextstep_jax"
PACKAGE = ROOT.name
# Importable from anywhere, so they may sit at the package top beside the CLIs.
CROSS_CUTTING = {"configs", "sharding", "latents", "host_memory", "__init__"}
# Packages that neither the data library nor the models may reach into.
LOADING_AND_ABOVE = ("checkpoint", "generation", "training", "bench")
WALLS = {
    "data": ("models", *LOADING_AND_ABOVE),  # the data pipeline runs without the model
    "models": ("data", *LOADING_AND_ABOVE),  # pure Flax modules: no I/O, no data, no loading
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_cli(tree: ast.Module) -> bool:
    """A module run as ``python -m``: it has an ``if __name__ == "__main__":`` block."""
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            names = [node.test.left, *node.test.comparators]
            if any(isinstance(n, ast.Name) and n.id == "__name__" for n in names) and any(
                    isinstance(n, ast.Constant) and n.value == "__main__" for n in names):
                return True
    return False


TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}
CLIS = {name for name, tree in TREES.items() if _is_cli(tree)}


def _imports(name: str, *, module_level_only: bool) -> list[tuple[str, int]]:
    """(imported package module, line) for every import of ours in module ``name``."""
    tree, is_package = TREES[name], MODULES[name].name == "__init__.py"
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` imports the module pkg.sub when there is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # ``import a.b.c`` where c is an attribute
                target = target.rpartition(".")[0]
            if target.split(".")[0] == PACKAGE:
                found.append((target, node.lineno))
    return sorted(set(found))


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_parses_and_is_found():
    assert {"nextstep_jax.configs", "nextstep_jax.latents", "nextstep_jax.data.pipeline",
            "nextstep_jax.models.vae"} <= set(MODULES)


@pytest.mark.parametrize("area", sorted(WALLS))
def test_walls(area):
    """No import at all (lazy ones inside functions included) crosses the wall, nor reaches a CLI."""
    crossings = []
    for name in (m for m in MODULES if _area(m) == area):
        for target, line in _imports(name, module_level_only=False):
            if _area(target) in WALLS[area] or (target in CLIS and _area(target) != area):
                crossings.append(f"{MODULES[name].relative_to(ROOT.parent)}:{line} imports {target}")
    assert not crossings, f"{area}/ must not import {', '.join(WALLS[area])} or CLIs:\n" + "\n".join(crossings)


def test_the_data_library_loads_without_the_models():
    """Transitively too: importing every data module (in a fresh interpreter) loads none of the walled areas."""
    data_modules = sorted(m for m in MODULES if _area(m) == "data")
    code = ("import importlib, json, sys\n"
            f"for m in {data_modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('nextstep_jax.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert "nextstep_jax.data.pipeline" in loaded and not [m for m in loaded if _area(m) in WALLS["data"]], loaded


def test_no_import_cycle():
    graph = {name: sorted({t for t, _ in _imports(name, module_level_only=True)} - {name}) for name in MODULES}
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])
    assert not cycles, "module-level import cycles:\n" + "\n".join(cycles)


def test_package_top_holds_only_clis_and_cross_cutting_modules():
    top = {p.stem: _module_name(p) for p in ROOT.glob("*.py")}
    loose = sorted(stem for stem, name in top.items() if stem not in CROSS_CUTTING and name not in CLIS)
    assert not loose, (f"library modules at the package top (move them into a subpackage; only CLIs and "
                       f"{sorted(CROSS_CUTTING)} belong there): {loose}")
