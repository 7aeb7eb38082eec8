"""The package's floors (docs/architecture.md): no import cycle among the project's modules
and no import from a lower floor to a higher one (issue 20).

Imports are read with ``ast``, nothing is imported: module-level and function-level
``import`` / ``from ... import`` statements naming the project's own packages
(``dinov2_hier``, ``eval``, ``bench``); imports under ``if TYPE_CHECKING:`` are left out
(they never run). ``from package import name`` counts as an import of the submodule
``package.name`` when there is one, else of the package's ``__init__``.
"""
from __future__ import annotations

import ast
from pathlib import Path

from dinov2_hier.paths import PROJECT_ROOT

PACKAGES = ("dinov2_hier", "eval", "bench")

#: Floor of each module, by dotted prefix (the longest entry that is the module or a
#: package above it wins). A new module outside these prefixes fails the test until it is
#: given a floor here and in docs/architecture.md.
FLOORS: dict[str, int] = {
    # floor 1: the tree, labels, configs, files, models, processes; the error layer; the
    # command-line plumbing (cli.py maps errors to exit codes by their two bases only).
    "dinov2_hier.errors": 1,
    "dinov2_hier.jsonfile": 1,
    "dinov2_hier.hierarchy": 1,
    "dinov2_hier.hierarchy_parse": 1,
    "dinov2_hier.labels": 1,
    "dinov2_hier.constraints": 1,
    "dinov2_hier.models": 1,
    "dinov2_hier.config": 1,
    "dinov2_hier.config_schema": 1,
    "dinov2_hier.io": 1,
    "dinov2_hier.eval_results": 1,  # what eval writes and export reads: below both
    "dinov2_hier.distributed": 1,
    "dinov2_hier.launch_env": 1,
    "dinov2_hier.paths": 1,
    "dinov2_hier.cpu": 1,
    "dinov2_hier.cli": 1,
    "dinov2_hier.render": 1,  # the HTML/SVG toolkit of the reports
    # floor 2
    "dinov2_hier.losses": 2,
    "dinov2_hier.heads": 2,
    "dinov2_hier.metrics": 2,
    "dinov2_hier.data": 2,
    # floor 3
    "dinov2_hier.train": 3,
    "dinov2_hier.finetune": 3,  # fine-tuning's model, loss, mixup and loop (its face: eval.finetune)
    # floor 4: the faces; the package's own __init__ is one too (FLOORS_EXACT: its lazy
    # ``dinov2_hier.load_backbone`` is hub's).
    "dinov2_hier.train.__main__": 4,
    "dinov2_hier.run": 4,
    "dinov2_hier.export": 4,
    "dinov2_hier.model_card": 4,  # export's model card
    "dinov2_hier.report": 4,  # training.html of a run directory
    "dinov2_hier.hub": 4,
    "bench": 4,
    # floor 5
    "eval": 5,
}
#: Floors of packages whose modules have floors of their own.
FLOORS_EXACT: dict[str, int] = {"dinov2_hier": 4}

#: Known imports from a lower floor to a higher one, ``(importer, imported)``. The list may
#: only shrink: the test fails when an entry no longer occurs, so that it is removed.
ALLOWED_UPWARD: set[tuple[str, str]] = {
    # bench/probe.py times the evaluation probes and feature extraction of eval/ (floor 5)
    # from bench/ (floor 4). To remove: move that benchmark under eval/, or give the
    # benchmarks of eval/ a floor above it.
    ("bench.probe", "eval.features"),
    ("bench.probe", "eval.probes"),
}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package ``__init__``) for every module of PACKAGES."""
    found: dict[str, tuple[Path, bool]] = {}
    for package in PACKAGES:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found[".".join(parts)] = (path, is_package)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, modules: dict[str, tuple[Path, bool]]) -> set[str]:
    """The project modules that module ``name`` imports (TYPE_CHECKING blocks left out)."""
    path, is_package = modules[name]
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def add(module: str, attribute: str | None) -> None:
        if module.split(".")[0] not in PACKAGES:
            return
        if attribute is not None and f"{module}.{attribute}" in modules:
            found.add(f"{module}.{attribute}")
            return
        while module and module not in modules:  # ``import a.b.name`` of an attribute
            module = module.rpartition(".")[0]
        if module and module != name:
            found.add(module)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:
                    visit_statement(other)
            else:
                visit_statement(child)

    def visit_statement(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, None)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                add(module, alias.name)
        else:
            visit(node)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, modules) for name in modules}


def floor_of(module: str) -> int:
    if module in FLOORS_EXACT:
        return FLOORS_EXACT[module]
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in FLOORS:
            return FLOORS[prefix]
    raise AssertionError(f"{module} has no floor: add it to FLOORS (tests/test_layering.py) "
                         f"and to docs/architecture.md")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module
    importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1 or node in graph[node]:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles among the project's modules: {cycles}"


def test_every_module_has_a_floor():
    for module in _graph():
        floor_of(module)


def test_no_module_imports_from_a_higher_floor():
    graph = _graph()
    upward = {(a, b) for a, targets in graph.items() for b in targets if floor_of(b) > floor_of(a)}
    new = sorted(upward - ALLOWED_UPWARD)
    assert not new, "imports from a lower floor to a higher one (docs/architecture.md): " + ", ".join(
        f"{a} (floor {floor_of(a)}) -> {b} (floor {floor_of(b)})" for a, b in new
    )
    gone = sorted(ALLOWED_UPWARD - upward)
    assert not gone, f"ALLOWED_UPWARD lists imports that no longer exist; remove them: {gone}"


def test_the_reader_sees_what_the_layering_needs(tmp_path):
    """The checks above see relative, function-level and ``from package import module``
    imports, and skip TYPE_CHECKING blocks."""
    fake = tmp_path / "fake.py"
    fake.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import T\nelse:\n"
                    "    from .c import T\n\ndef f():\n    import dinov2_hier.b.x\n")
    modules = {name: (fake, False) for name in ("dinov2_hier.a", "dinov2_hier.b", "dinov2_hier.c")}
    assert _imports("dinov2_hier.a", modules) == {"dinov2_hier.b", "dinov2_hier.c"}  # b: only in f()
    graph = _graph()
    assert "dinov2_hier.errors" in graph["dinov2_hier.cli"]  # from .errors import ...
    assert "dinov2_hier.distributed" in graph["dinov2_hier.train.loop"]  # from .. import distributed
    assert "dinov2_hier.hub" in graph["dinov2_hier"]  # inside __getattr__
    assert "dinov2_hier.train.loop" in graph["dinov2_hier.train.__main__"]  # inside main()
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
