"""The package's imports run one way: no module imports one that (directly or not) imports it back."""

from __future__ import annotations

import ast

from tests.launch import REPO


def _import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its text (function-level imports included)."""
    modules = {}
    for path in (REPO / "dist_robust").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                submodules = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                graph[name] |= submodules
                if len(submodules) < len(node.names):  # names defined in the module itself
                    graph[name].add(node.module)
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names} & modules.keys()
        graph[name].discard(name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle(_import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert "dist_robust.tuning.spec" in _import_graph()["dist_robust.tuning.space_checks"]


# Lowest first: a module imports only from its own layer or those before it.
LAYERS = ("infra", "objectives", "config", "data", "model", "run", "analysis", "tuning", "experiment", "cli")


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "cli"  # (the package itself: its entry points)


def test_imports_run_downward_through_the_layers():
    graph = _import_graph()
    assert {_layer(m) for m in graph} == set(LAYERS)
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                    if LAYERS.index(_layer(d)) > LAYERS.index(_layer(m)))
    assert not upward, upward


def _external_imports() -> dict[str, set[str]]:
    """module -> the top-level packages outside dist_robust it imports anywhere (function-level too)."""
    out = {}
    for path in (REPO / "dist_robust").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
        out[name] = found
    return out


def test_only_storage_imports_fsspec_and_mlflow_stays_where_runs_are_written_read_or_served():
    imports = _external_imports()
    assert {m for m, found in imports.items() if "fsspec" in found} == {"dist_robust.infra.storage"}
    mlflow = {m for m, found in imports.items() if "mlflow" in found}
    allowed = {"dist_robust.run.tracking", "dist_robust.tuning.sweep_runs", "dist_robust.model.serving"}
    assert mlflow and all(m in allowed or _layer(m) == "analysis" for m in mlflow), sorted(mlflow)


def test_the_config_names_the_built_in_models_the_model_layer_builds():
    from dist_robust.config.run_config import BUILTIN_MODELS
    from dist_robust.model.build import BUILTIN_CONFIGS

    assert set(BUILTIN_MODELS) == set(BUILTIN_CONFIGS)
