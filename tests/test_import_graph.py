"""The package imports without cycles: every module imports on its own, and no module reaches itself.

The graph is read statically from `import` statements, module-level and inside functions alike (a
function-level import that closes a cycle only hides it until the function runs), skipping
`if TYPE_CHECKING:` blocks. Imports made with `importlib.import_module` (the method plug-ins) are
recorded while a fresh interpreter imports every module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import deltatune

PACKAGE_ROOT = Path(deltatune.__file__).parent

IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil, sys, traceback
edges, failures = [], {}
original = importlib.import_module
def recording(name, package=None):
    caller = sys._getframe(1).f_globals.get("__name__", "")
    if caller.startswith("deltatune") and name.startswith("deltatune"):
        edges.append([caller, name])
    return original(name, package)
importlib.import_module = recording
import deltatune
for module in pkgutil.walk_packages(deltatune.__path__, "deltatune."):
    try:
        original(module.name)
    except BaseException:  # SystemExit too: a module that runs something when imported
        failures[module.name] = traceback.format_exc(limit=3)
print(json.dumps({"edges": edges, "failures": failures}))
"""


def module_files() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, whether it is a package's __init__)."""
    modules = {}
    for path in PACKAGE_ROOT.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_names(tree: ast.AST, package: str) -> set[str]:
    """Dotted names of what `tree` imports (both `module` and `module.name` for `from module import name`)."""
    names: set[str] = set()
    pending = [tree]
    while pending:
        node = pending.pop()
        if _is_type_checking(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            names.update({base, *(f"{base}.{alias.name}" for alias in node.names)})
        pending.extend(ast.iter_child_nodes(node))
    return names


def static_graph() -> dict[str, set[str]]:
    modules = module_files()
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets = set()
        for imported in imported_names(ast.parse(path.read_text(encoding="utf-8")), package):
            # `from deltatune.x import y` gives deltatune.x (a module) and deltatune.x.y (a module, or a name in x)
            if imported in modules:
                targets.add(imported)
            elif imported.rpartition(".")[0] in modules:
                targets.add(imported.rpartition(".")[0])
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it starts, or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_every_module_imports_and_the_import_graph_has_no_cycle():
    result = subprocess.run([sys.executable, "-c", IMPORT_EVERY_MODULE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["failures"], "modules that do not import:\n" + "\n".join(
        f"{name}: {trace}" for name, trace in report["failures"].items()
    )
    graph = static_graph()
    assert len(graph) > 40 and "deltatune.run" in graph["deltatune.freelm.artifact"], (
        "the static pass found the imports"
    )
    for source, target in report["edges"]:
        graph.setdefault(source, set()).add(target)
    assert ["deltatune.methods", "deltatune.methods.freeze"] in report["edges"], "the plug-in imports were recorded"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    tree = ast.parse("import x\nif TYPE_CHECKING:\n    import hidden\ndef f():\n    from .y import z\n")
    assert imported_names(tree, "pkg.sub") == {"x", "pkg.sub.y", "pkg.sub.y.z"}
