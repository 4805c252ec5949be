"""The package's layering, read from the source (AST), so it holds without importing anything.

- ``components/`` is pure torch + transformers: it imports neither Lightning nor lit_prune's stages, callbacks or
  command-line modules, not even inside a function;
- ``hf.py`` and ``io.py`` sit below everything that loads models or writes outputs: no Lightning, no stages or
  callbacks, and ``io.py`` imports nothing from lit_prune;
- no stage module imports another stage module (shared code lives in ``base.py``, ``recovery.py``, ...), and no
  callback imports a stage (callbacks check a capability, so other projects can reuse them);
- the module-level import graph of the package has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "lit_prune"
MODULES = {
    ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
    for path in sorted(PACKAGE.rglob("*.py"))
}
# Stage modules proper; the other files in stages/ are their shared bases and helpers.
STAGE_MODULES = {f"lit_prune.stages.{name}" for name in
                 ("baseline", "distill", "endpoint_lora", "mask_search", "perplexity")}
UPPER_LAYERS = ("lightning", "pytorch_lightning", "lit_prune.stages", "lit_prune.callbacks", "lit_prune.cli",
                "lit_prune.__main__", "lit_prune.cli_errors", "lit_prune.teacher_cache_cli",
                "lit_prune.evaluate_models", "lit_prune.loggers", "lit_prune.data", "lit_prune.reports",
                "lit_prune.tasks")


def imports(module: str, top_level_only: bool = False) -> set[str]:
    """Absolute names of the modules ``module`` imports; ``from a import b`` gives ``a.b`` when that is a module."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return {name for name in found if name}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


def test_the_source_tree_is_read():
    assert {"lit_prune.hf", "lit_prune.io", "lit_prune.components.surgery", "lit_prune.stages.recovery"} <= set(MODULES)
    assert "lightning" in {n.split(".")[0] for n in imports("lit_prune.stages.base")}
    # Function-level imports are seen too (export_from_mask used to import stages.base inside the function).
    assert "lit_prune.components.quantize" in imports("lit_prune.cli")


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("lit_prune.components")])
def test_components_never_reach_up(module):
    upward = sorted(name for name in imports(module) if _within(name, UPPER_LAYERS))
    assert not upward, f"{module} imports {upward}: components stay pure torch + transformers (docs/architecture.md)"


@pytest.mark.parametrize("module", ["lit_prune.hf", "lit_prune.io", "lit_prune.deprecation", "lit_prune.metrics"])
def test_low_level_modules_never_reach_up(module):
    upward = sorted(name for name in imports(module) if _within(name, UPPER_LAYERS))
    assert not upward, f"{module} imports {upward}"


def test_io_depends_on_the_standard_library_only():
    assert not {name for name in imports("lit_prune.io") if name.split(".")[0] in ("lit_prune", "torch", "lightning")}


@pytest.mark.parametrize("module", sorted(STAGE_MODULES))
def test_no_stage_imports_a_sibling_stage(module):
    siblings = sorted(name for name in imports(module) if _within(name, tuple(STAGE_MODULES - {module})))
    assert not siblings, f"{module} imports {siblings}: move what they share to stages/base.py or a helper module"


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("lit_prune.callbacks")])
def test_callbacks_depend_on_capabilities_not_stages(module):
    stages = sorted(name for name in imports(module) if _within(name, ("lit_prune.stages",)))
    assert not stages, f"{module} imports {stages}: check the attribute or method the callback needs instead"


def _graph() -> dict[str, set[str]]:
    """Module-level import edges between lit_prune modules, including the package ``__init__`` an import runs.

    ``import lit_prune.a.b`` executes ``lit_prune.a``'s ``__init__`` first, so that is an edge too; a module's own
    enclosing packages are left out (they are already being imported when the module runs).
    """
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        own = {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}
        edges: set[str] = set()
        for name in imports(module, top_level_only=True):
            parts = name.split(".")
            for i in range(2, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in MODULES and target not in own and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = _graph()
    assert "lit_prune.hf" in graph["lit_prune.components.checkpoint"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
