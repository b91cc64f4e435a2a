"""The package's shape: no import cycles, imports at the top, one registry of allocation methods."""
from __future__ import annotations

import ast
from pathlib import Path

from acttail_core import methods
from acttail_core.budget import Budget
from acttail_core.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("acttail_core", "app")
# Modules imported inside functions on purpose: Triton is optional where there is no GPU.
LAZY = {"acttail_core.decode", "acttail_core.triton_topk", "acttail_core.triton_spectra"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, name: str, node: ast.AST, modules: set[str]) -> list[str]:
    """The package modules an import statement loads (relative imports resolved; ``from package import
    submodule`` loads the submodule; a module's own parent packages are always loaded first, so not counted)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    if isinstance(node, ast.Import):
        found = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        found = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    else:
        return []
    return [m for m in dict.fromkeys(found) if m in modules and not name.startswith(m + ".")]


def graph() -> tuple[dict[str, set[str]], list[str]]:
    files = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    edges: dict[str, set[str]] = {}
    nested = []
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        top = set(tree.body)
        targets = set()
        for node in ast.walk(tree):
            found = imported(path, name, node, set(files))
            targets.update(found)
            if found and node not in top and not set(found) <= LAZY and not _under_type_checking(tree, node):
                nested.append(f"{name}: {found}")
        edges[name] = targets - {name}
    return edges, nested


def _under_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    return any(isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test) and node in ast.walk(n)
               for n in tree.body)


def test_no_import_cycles() -> None:
    edges, _ = graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in edges.get(node, ()):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for module in edges:
        if module not in state:
            visit(module, [module])


def test_package_imports_are_at_the_top() -> None:
    _, nested = graph()
    assert nested == []


def test_every_method_list_comes_from_the_registry() -> None:
    parser = build_parser()
    allocate = next(a for a in parser._subparsers._group_actions[0].choices["allocate"]._actions
                    if "--method" in a.option_strings)
    assert tuple(allocate.choices) == methods.METHOD_NAMES
    flags = {o for a in parser._subparsers._group_actions[0].choices["allocate"]._actions for o in a.option_strings}
    assert {f"--{knob.name}" for knob in methods.KNOBS} <= flags
    schema = Budget.model_json_schema()["properties"]
    assert schema["temperature"]["anyOf"][0]["maximum"] == methods.TEMPERATURE.high
    assert schema["eps"]["anyOf"][0]["exclusiveMaximum"] == methods.EPS.high
