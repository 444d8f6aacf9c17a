"""The package's layout: no import cycles, no project imports hidden in functions.

Read from the source with :mod:`ast` (nothing is imported), so a cycle that
only in-function imports kept from failing at import time still shows.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "unet_pipe"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

#: Third-party modules that take seconds to import; a project module that pulls one in at its
#: top may be imported inside the function that needs it, so that ``unet-pipe --help`` and the
#: light subcommands do not pay for it.
HEAVY_LIBRARIES = ("torch", "matplotlib")


#: In-function project imports kept on purpose, with the reason.
EXCEPTIONS = {
    # model.py is copied verbatim into exported bioimage.io packages as their architecture source,
    # loaded there without unet-pipe installed: its top level may import only torch and numpy.
    ("model", "__init__"), ("model", "errors"), ("model", "provenance"), ("model", "atomic"),
}


def _module_names(package: Path) -> set[str]:
    return {p.stem for p in package.glob("*.py")}


def _project_targets(node: ast.Import | ast.ImportFrom, modules: set[str]) -> list[str]:
    """The ``unet_pipe`` modules an import statement reads (``unet_pipe`` itself as ``__init__``)."""
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] if "." in a.name else "__init__"
                for a in node.names if a.name.split(".")[0] == "unet_pipe"]
    name = node.module or ""
    if node.level:  # relative import inside the package
        name = "unet_pipe" + (f".{name}" if name else "")
    if name == "unet_pipe":
        return [a.name if a.name in modules else "__init__" for a in node.names]
    if name.startswith("unet_pipe."):
        return [name.split(".")[1]]
    return []


def _imports(path: Path, modules: set[str]) -> tuple[set[str], list[tuple[int, str]], set[str]]:
    """(project modules imported anywhere, (line, module) of in-function ones, heavy libraries at top)."""
    tree = ast.parse(path.read_text(), str(path))
    in_function: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    targets: set[str] = set()
    inner: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _project_targets(node, modules):
                targets.add(target)
                if id(node) in in_function:
                    inner.append((node.lineno, target))
    heavy = set()
    for node in tree.body:  # top level only: what importing the module costs
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        heavy.update(n.split(".")[0] for n in names if n.split(".")[0] in HEAVY_LIBRARIES)
    return targets - {path.stem}, inner, heavy


def _graph(package: Path) -> tuple[dict[str, set[str]], dict[str, list[tuple[int, str]]], set[str]]:
    modules = _module_names(package)
    graph, inner, heavy_direct, top = {}, {}, set(), {}
    for path in sorted(package.glob("*.py")):
        graph[path.stem], inner[path.stem], heavy = _imports(path, modules)
        top[path.stem] = graph[path.stem] - {t for _, t in inner[path.stem]}
        if heavy:
            heavy_direct.add(path.stem)
    # A module is heavy if importing it imports torch/matplotlib, directly or through a project module.
    heavy_all = set(heavy_direct)
    changed = True
    while changed:
        changed = False
        for name, targets in top.items():
            if name not in heavy_all and targets & heavy_all:
                heavy_all.add(name)
                changed = True
    return graph, inner, heavy_all


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_targets_cover_every_form(tmp_path):
    (tmp_path / "m.py").write_text(
        "import unet_pipe.a\nfrom unet_pipe import b, __version__\nfrom .c import x\n"
        "def f():\n    from unet_pipe.d import y\n"
    )
    targets, inner, _ = _imports(tmp_path / "m.py", {"a", "b", "c", "d"})
    assert targets == {"a", "b", "__init__", "c", "d"}
    assert inner == [(5, "d")]


def test_package_has_no_import_cycle():
    graph, _, _ = _graph(PACKAGE)
    assert len(graph) > 40  # the package was found
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_no_project_import_inside_a_function_except_heavy_modules():
    """In-function imports of the project's own modules are allowed only for modules that load
    torch or matplotlib (import cost), never to hold an import cycle apart."""
    _, inner, heavy = _graph(PACKAGE)
    assert {"model", "train", "predict"} <= heavy and "errors" not in heavy and "cli_common" not in heavy
    hidden = [f"{name}.py:{line} imports {target}" for name, found in inner.items() for line, target in found
              if target not in heavy and (name, target) not in EXCEPTIONS]
    assert not hidden, "move these imports to the top of their module:\n" + "\n".join(hidden)


@pytest.mark.parametrize("module", ["cli", "cli_common"])
def test_cli_entry_imports_no_heavy_module(module):
    """``unet-pipe --help`` and the error handling load neither torch nor matplotlib."""
    graph, inner, heavy = _graph(PACKAGE)
    top = graph[module] - {t for _, t in inner[module]}
    assert not top & heavy


def test_gpu_check_scripts_import_no_cycle():
    """benchmarks/gpu_check.py and gpu_check_steps.py: one imports the other, not both ways."""
    modules = {p.stem for p in BENCHMARKS.glob("*.py")}
    graph = {}
    for name in ("gpu_check", "gpu_check_steps"):
        tree = ast.parse((BENCHMARKS / f"{name}.py").read_text())
        graph[name] = {
            a.name.split(".")[0] if isinstance(node, ast.Import) else (node.module or "").split(".")[0]
            for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
            for a in node.names
        } & modules - {name}
    assert _cycle(graph) is None


#: Longest function the package may hold, in lines (``end_lineno - lineno + 1``, docstring included).
MAX_FUNCTION_LINES = 80
#: Functions still longer, with their length when this check came in: each may only shrink, and
#: leaves this table once it is split (the test says so).
LONG_FUNCTIONS: dict[str, int] = {}


def _function_lengths(package: Path) -> dict[str, int]:
    lengths = {}
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{path.stem}.{node.name}"
                lengths[name] = max(lengths.get(name, 0), node.end_lineno - node.lineno + 1)
    return lengths


def test_function_length_counts_from_def_to_last_line_docstring_included(tmp_path):
    (tmp_path / "m.py").write_text('def f():\n    """Doc."""\n    return 1\n\n\nclass C:\n    def g(self):\n        pass\n')
    assert _function_lengths(tmp_path) == {"m.f": 3, "m.g": 2}


def test_no_function_over_80_lines():
    lengths = _function_lengths(PACKAGE)
    too_long = {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES and n > LONG_FUNCTIONS.get(name, 0)}
    assert not too_long, f"split these functions (at most {MAX_FUNCTION_LINES} lines): {too_long}"
    done = sorted(name for name in LONG_FUNCTIONS if lengths.get(name, 0) <= MAX_FUNCTION_LINES)
    assert not done, f"these are short now: remove them from LONG_FUNCTIONS: {done}"
