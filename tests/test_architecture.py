"""ARCHITECTURE.md's import rules, enforced on the source: where the heavy frameworks may be imported, the
library never imports the CLI, commands do not import each other, and module-level imports have no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY, CLI = ROOT / "fmt_audit", ROOT / "cli"

# framework -> the modules (dotted prefixes) that may import it at module level; anywhere else, only inside a
# function (so that `import fmt_audit`, `--help` and `inspect` load none of them)
AT_MODULE_LEVEL = {
    "torch": ("fmt_audit.backends.torch", "fmt_audit.fmt.gradient", "fmt_audit.fmt.trace", "fmt_audit.repair.finetune",
              "fmt_audit.repair.ibau", "fmt_audit.repair.patch_evidence", "fmt_audit.repair.pipeline",
              "fmt_audit.repair.pruning",
              "fmt_audit.verdict.evidence"),
    "onnx2torch": (),
    "onnxruntime": (),
    "onnx_graphsurgeon": (),
    "ray": (),
    "matplotlib": (),
}
# framework -> the modules that may import it at all
ANYWHERE = {
    "onnx2torch": ("fmt_audit.backends.torch",),
    "onnxruntime": ("fmt_audit.backends.onnxrt.session",),
    "onnx_graphsurgeon": ("fmt_audit.backends.onnxrt.instrument", "fmt_audit.backends.onnxrt.suffix"),
    "ray": ("fmt_audit.fleet",),
    "matplotlib": ("fmt_audit.report.html_report",),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "cli":
        parts[0] = "fmt_audit_cli"
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """Every module ``path`` imports, and whether at module level (not inside a function)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue    # type-only imports run nowhere
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.append((base, top))
                found.extend((f"{base}.{alias.name}", top) for alias in child.names)
            visit(child, inside)

    visit(tree, True)
    return found


SOURCES = {_module_name(p): p for p in [*LIBRARY.rglob("*.py"), *CLI.glob("*.py")]}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("framework", sorted(AT_MODULE_LEVEL))
def test_heavy_frameworks_are_imported_only_where_the_rules_allow(framework):
    broken = []
    for module, path in SOURCES.items():
        for name, top in _imports(path):
            if name.split(".")[0] != framework:
                continue
            if framework in ANYWHERE and not _within(module, ANYWHERE[framework]):
                broken.append(f"{module} imports {framework}")
            elif top and not _within(module, AT_MODULE_LEVEL[framework]) and framework == "torch":
                broken.append(f"{module} imports torch at module level")
            elif top and framework != "torch":
                broken.append(f"{module} imports {framework} at module level")
    assert not broken, broken


def test_the_library_never_imports_the_cli_and_commands_do_not_import_each_other():
    broken = [f"{module} imports {name}" for module, path in SOURCES.items() if module.startswith("fmt_audit.")
              or module == "fmt_audit" for name, _ in _imports(path) if name.startswith("fmt_audit_cli")]
    commands = [m for m in SOURCES if m.startswith("fmt_audit_cli.") and m.endswith("_cmd")]
    broken += [f"{module} imports {name}" for module in commands for name, _ in _imports(SOURCES[module])
               if _within(name, tuple(c for c in commands if c != module))]
    assert not broken, broken


def test_module_level_imports_have_no_cycles():
    graph = {}
    for module, path in SOURCES.items():
        targets = set()
        for name, top in _imports(path):
            if not top:
                continue
            while name and name not in SOURCES:     # "package.symbol" -> the module that defines it
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):   # a package's own __init__
                targets.add(name)
        graph[module] = targets
    cycles, state = [], {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in state:
                walk(target, [*stack, target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not cycles, cycles


def test_the_rules_see_the_imports_they_judge():
    """The checker itself: it finds a module-level torch import and one inside a function in known files."""
    gradient = dict((name, top) for name, top in _imports(SOURCES["fmt_audit.fmt.gradient"]))
    assert gradient.get("torch") is True
    session = [(name, top) for name, top in _imports(SOURCES["fmt_audit.backends.onnxrt.session"])
               if name.startswith("onnxruntime")]
    assert session and not any(top for _, top in session)
