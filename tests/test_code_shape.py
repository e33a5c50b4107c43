"""Code shape: no function or method in the package runs over about 80 lines.

A long function is read in pieces and changed in pieces; the house style keeps each one to what fits on
a screen. The count is the function's whole extent, from its `def` line to its last line (decorators
excluded, docstring and comments included), read from the source with `ast`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import deltatune

PACKAGE_ROOT = Path(deltatune.__file__).parent
MAX_FUNCTION_LINES = 80

ALLOWED: dict[str, str] = {
    # "path relative to the package:qualified name": why it may stay long for now
}
"""Functions allowed over the limit, each with its reason; shrink this list, never grow it."""


def function_lengths(tree: ast.AST) -> dict[str, int]:
    """Qualified name (Class.method, outer.inner) -> lines from `def` to the function's last line."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                lengths[name] = child.end_lineno - child.lineno + 1
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return lengths


def long_functions() -> dict[str, int]:
    """'path:name' -> length, for every function of the package over MAX_FUNCTION_LINES."""
    found = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        relative = path.relative_to(PACKAGE_ROOT).as_posix()
        for name, length in function_lengths(ast.parse(path.read_text(encoding="utf-8"))).items():
            if length > MAX_FUNCTION_LINES:
                found[f"{relative}:{name}"] = length
    return found


def test_no_function_is_over_80_lines_outside_the_allow_list():
    offenders = {name: length for name, length in long_functions().items() if name not in ALLOWED}
    listed = "\n".join(f"  {name}: {length} lines" for name, length in sorted(offenders.items()))
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines (split them along their seams):\n{listed}"


def test_the_allow_list_names_only_functions_that_are_still_long():
    stale = sorted(set(ALLOWED) - set(long_functions()))
    assert not stale, f"no longer over {MAX_FUNCTION_LINES} lines (or gone): remove them from ALLOWED: {stale}"


def test_lengths_count_from_def_to_the_last_line_without_decorators():
    source = (
        "@decorator\ndef outer():\n    x = 1\n\n    def inner():\n        return x\n    return inner\n"
        "class Box:\n    def method(self):\n        pass\n"
    )
    assert function_lengths(ast.parse(source)) == {"outer": 6, "outer.inner": 2, "Box.method": 2}
