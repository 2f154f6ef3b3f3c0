"""The layout keeps the architecture visible: no import cycles (deferred imports included), one
pass per file in passes/ and none too long, and no module outside targets/ and the backend
packages that names a target."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

from edgeq.registry import targets

ROOT = Path(__file__).resolve().parents[1]
# Import name of each source folder (pyproject.toml's package-dir).
PACKAGE_DIRS = {"edgeq": ROOT / "edgeq", "edgeq.passes": ROOT / "passes", "edgeq.targets": ROOT / "targets",
                "edgeq.models": ROOT / "models"}
MAX_PASS_FILE_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every edgeq module `module` imports at run time, wherever the import statement sits
    (functions included); imports only made for type checkers are not run and do not count."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking_block(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from package import module` reads the module, not the package's names
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found & set(known)


def test_no_import_cycles_counting_imports_deferred_into_functions():
    known = _modules()
    graph = nx.DiGraph()
    for module, path in known.items():
        graph.add_node(module)
        graph.add_edges_from((module, dep) for dep in _imports(module, path, known))
    cycles = sorted((c for c in nx.simple_cycles(graph)), key=len)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:10])


def _pass_classes(tree: ast.Module) -> list[str]:
    """Classes registered as passes (decorated with register_pass)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "register_pass")
                or (isinstance(d, ast.Attribute) and d.attr == "register_pass") for d in node.decorator_list):
            names.append(node.name)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "passes").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_file_in_passes_holds_at_most_one_pass_and_is_short(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_PASS_FILE_LINES, f"{path.name} has {lines} lines: move its helpers beside it"
    passes = _pass_classes(ast.parse(path.read_text()))
    assert len(passes) <= 1, f"{path.name} holds several passes: {passes}"


def test_every_registered_pass_lives_in_a_module_named_after_it():
    from edgeq.registry import passes

    for name, cls in passes().items():
        assert cls.__module__.rsplit(".", 1)[-1] == name.replace("-", "_"), f"pass {name} lives in {cls.__module__}"


def _string_constants(tree: ast.Module) -> list[tuple[int, str]]:
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_module_outside_targets_and_backends_names_a_target():
    names = set(targets())
    assert {"x86-vnni", "fpga"} <= names  # the check below would pass vacuously without targets
    offenders = []
    for module, path in _modules().items():
        if module.startswith(("edgeq.targets", "edgeq.backends")):
            continue
        for line, text in _string_constants(ast.parse(path.read_text())):
            words = set(text.replace(",", " ").replace("'", " ").replace('"', " ").split())
            hit = sorted(words & names)
            if hit:
                offenders.append(f"{path.relative_to(ROOT)}:{line} names {hit[0]!r}")
    assert not offenders, "\n".join(offenders)
