"""pyproject.toml ships every package of the source tree under the `astraea` name."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
TOP = {"optimizer": "astraea", "passes": "astraea.passes", "plugins": "astraea.plugins"}


def test_every_source_package_is_listed():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, dirs = set(tool["packages"]), tool["package-dir"]
    for folder, name in TOP.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            package = ".".join([name, *rel.parts]) if rel.parts else name
            assert package in packages, f"{package} ({init.parent}) is missing from [tool.setuptools] packages"
            assert dirs[package] == str(init.parent.relative_to(ROOT)), package
    assert "*.safetensors" in tool["package-data"]["astraea.bundled"]
    assert not any(p.split(".")[0] != "astraea" for p in packages)  # no generic top-level names


def _modules() -> dict[str, Path]:
    """Every module of the package by its import name (astraea.x.y -> file)."""
    out = {}
    for folder, name in TOP.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([name, *parts])] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its file (top level or in a function)."""
    import ast

    found = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {target} | {f"{target}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


def test_dependencies_point_one_way():
    """The modules' imports (function-level ones included) form no cycle: the stages depend
    on the shared vocabulary (schema, schedule, manifest, timing), never the other way."""
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [m, dep] if dep in path else [m, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    # the shared vocabulary imports no stage
    for leaf in ("astraea.schema", "astraea.schedule", "astraea.manifest", "astraea.timing", "astraea.errors"):
        assert graph[leaf] <= {"astraea.errors"}, (leaf, graph[leaf])
    # the runtime needs none of the build code: the ops (and their TensorRT plugins), the manifest,
    # and for sequence-parallel engines the collectives and mesh (parallel, itself no build code)
    assert {m for m in graph["astraea.runtime"] if not m.startswith("astraea.plugins")} <= {
        "astraea.errors", "astraea.manifest", "astraea.parallel"}, graph["astraea.runtime"]
    assert graph["astraea.parallel"] <= {"astraea.errors", "astraea.plugins"}, graph["astraea.parallel"]


def test_no_module_over_500_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_every_tool_imports():
    """The benchmark and maintenance scripts import what they use from where it lives now."""
    import importlib.util
    import sys

    sys.path.insert(0, str(ROOT / "tools"))  # tools import each other (measure_sketch: measure_search)
    try:
        for path in sorted((ROOT / "tools").glob("*.py")):
            spec = importlib.util.spec_from_file_location(f"_tool_{path.stem}", path)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
    finally:
        sys.path.remove(str(ROOT / "tools"))
