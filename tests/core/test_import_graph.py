"""The package's architecture, checked on its source: imports between its own modules form
no cycle, run downwards only (core <- io <- model <- inference <- annotations/training <-
evaluation <- napari/Qt edge <- cli), and are at module level unless marked ``# lazy:``.

A function-level import of a package module is allowed only for a heavy edge (torch, Qt,
napari, SimpleITK behind it) and must say so on its line: ``# lazy: <why>``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = "napari_resmtnet"
SRC = Path(__file__).resolve().parents[2] / PKG

#: rank of each part of the package: a module may import only modules of lower or equal rank.
#: Top-level modules not named here are the numpy-only core (rank 0).
LAYERS = {
    "io": 1,
    "model": 2,
    "inference": 3,
    "annotations": 4,
    "training": 4,
    "evaluation": 5,
    "_reader": 6,
    "_writer": 6,
    "_sample_data": 6,
    "layers": 6,
    "views": 6,
    "_widget": 6,
    "_qt": 6,
    "cli": 7,
    "__main__": 7,
}
#: the package's own __init__: the public facade (lazy re-exports and the version); it sits
#: outside the layers, its imports of other modules all lazy.
FACADE = PKG


def rank(module: str) -> int:
    parts = module.split(".")[1:]
    return LAYERS.get(parts[0], 0) if parts else -1


def modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _targets(node, mod: str, is_pkg: bool, mods) -> list[str]:
    """Package modules an import statement of module ``mod`` names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PKG]
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != PKG:
        return []
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names]


def imports(mods) -> list[tuple[str, str, bool, bool, int]]:
    """(importer, imported, at function level, marked lazy, line) for every import between
    the package's modules."""
    found = []
    for mod, (path, is_pkg) in mods.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        stack = [(ast.parse(text), False)]
        while stack:
            node, in_function = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    # the mark may sit on any line of a wrapped import statement
                    lazy = any("# lazy:" in ln for ln in lines[child.lineno - 1 : child.end_lineno])
                    for t in _targets(child, mod, is_pkg, mods):
                        if t != mod:
                            found.append((mod, t, in_function, lazy, child.lineno))
                nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                stack.append((child, in_function or nested))
    return found


def cycles(edges) -> list[list[str]]:
    graph: dict[str, set[str]] = {}
    for a, b, *_ in edges:
        graph.setdefault(a, set()).add(b)
    out, state = [], {}

    def dfs(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                out.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                dfs(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node, [])
    return out


def test_no_import_cycles():
    found = cycles(imports(modules()))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_function_level_imports_are_marked_lazy():
    bad = sorted(
        {f"{a}:{line} imports {b}" for a, b, in_function, lazy, line in imports(modules()) if in_function and not lazy}
    )
    assert not bad, "function-level imports of package modules without '# lazy: <why>':\n" + "\n".join(bad)


def test_imports_run_downwards():
    bad = [
        f"{a}:{line} imports {b} (rank {rank(a)} -> {rank(b)})"
        for a, b, _, _, line in imports(modules())
        if a != FACADE and b != FACADE and rank(b) > rank(a)
    ]
    assert not bad, "upward imports:\n" + "\n".join(bad)
