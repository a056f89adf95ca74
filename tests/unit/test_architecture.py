"""Architecture rules, checked statically (``ast``, nothing is imported):

1. The import graph of ``mythos/``, ``data_prep/``, ``launch/`` and ``bench/`` is a DAG, counting
   imports inside functions too (a function-level import hides a cycle, it does not remove it).
2. The library does not depend on the tools: ``mythos.*`` imports nothing from ``data_prep``,
   ``launch``, ``bench`` or ``tests``.
3. No ``.py`` file is longer than ``MAX_LINES`` unless its first docstring or comment says why
   (contains "long because" or "over 450 lines:").
4. The core (``CORE``: config, run directory, distributed, I/O, CLI helpers, FLOPs accounting,
   the model, data and training packages) imports none of the tools built on it (``LIB_TOOLS``:
   the planner, compare, the experiment report, export and the HF code), not even inside a
   function; and :mod:`mythos.run_dir`, which every layer uses, imports nothing of mythos.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("mythos", "data_prep", "launch", "bench")
TOOLS = ("data_prep", "launch", "bench", "tests")
MAX_LINES = 450
CORE = ("mythos.config", "mythos.run_dir", "mythos.dist", "mythos.io", "mythos.cli_common", "mythos.accounting",
        "mythos.model", "mythos.data", "mythos.train")
LIB_TOOLS = ("mythos.plan", "mythos.compare", "mythos.experiment_report", "mythos.experiment_lm",
             "mythos.experiment_multihop", "mythos.experiment_plots", "mythos.export", "mythos.hf")
LONG_REASONS = ("long because", "over 450 lines:")

#: Cycles that exist and are scheduled to be removed (owner: the trainer's maintainers). Each
#: entry is one cycle as a sorted tuple of its modules. Delete an entry once its cycle is gone;
#: the test fails on any cycle not listed here.
KNOWN_CYCLES_TO_FIX: set[tuple[str, ...]] = set()

#: Files over ``MAX_LINES`` without a stated reason, scheduled to be split or justified.
KNOWN_LONG_FILES_TO_FIX: set[str] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    """Every module of the checked folders, by dotted name (packages by their own name)."""
    return {_module_name(p): p for folder in FOLDERS for p in sorted((REPO / folder).rglob("*.py"))}


def _imported_names(path: Path, module: str) -> set[str]:
    """Dotted names this file imports, anywhere in it (module level, functions, classes).
    ``from x import y`` yields ``x.y``, which :func:`_resolve` maps to module ``x.y`` or, when
    ``y`` is a name inside ``x``, to ``x``; relative imports are made absolute."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(p for p in [*base_parts, node.module or ""] if p)
            else:
                base = node.module or ""
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _resolve(name: str, modules: set[str]) -> str | None:
    """The most specific known module that ``name`` denotes (``a.b.func`` -> ``a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(graph, raw)``: edges between known modules, and every imported dotted name per module."""
    sources = _sources()
    known = set(sources)
    graph: dict[str, set[str]] = {m: set() for m in sources}
    raw: dict[str, set[str]] = {}
    for mod, path in sources.items():
        raw[mod] = _imported_names(path, mod)
        for name in raw[mod]:
            target = _resolve(name, known)
            if target is not None and target != mod:
                graph[mod].add(target)
    return graph, raw


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _cycle_path(graph: dict[str, set[str]], comp: list[str]) -> str:
    """One concrete loop through ``comp`` (``a -> b -> a``), for the failure message."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [start]
                    while v != start:
                        path.append(v)
                        v = prev[v]
                    return " -> ".join([start, *reversed(path[1:]), start])
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return " -> ".join(comp)


def test_graph_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The parser itself: a function-level import and a relative import are both edges."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from mythos.data.format import load_manifest\n\nfrom . import io\n")
    names = _imported_names(src, "mythos.m")
    known = set(_sources())
    assert _resolve("mythos.data.format.load_manifest", known) == "mythos.data.format"
    assert "mythos.data.format.load_manifest" in names and "mythos.io" in names
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_import_graph_is_a_dag() -> None:
    graph, _ = import_graph()
    cycles = find_cycles(graph)
    unexpected = [c for c in cycles if tuple(c) not in KNOWN_CYCLES_TO_FIX]
    msg = "\n".join(_cycle_path(graph, c) for c in unexpected)
    assert not unexpected, f"import cycles (function-level imports count):\n{msg}"
    fixed = KNOWN_CYCLES_TO_FIX - {tuple(c) for c in cycles}
    assert not fixed, f"cycle(s) {sorted(fixed)} are gone: remove them from KNOWN_CYCLES_TO_FIX"


def test_library_does_not_import_tools() -> None:
    _, raw = import_graph()
    bad = sorted(
        f"{mod} imports {name}"
        for mod, names in raw.items()
        if mod == "mythos" or mod.startswith("mythos.")
        for name in names
        if name.split(".")[0] in TOOLS
    )
    assert not bad, "the library (mythos/) must not depend on tools:\n" + "\n".join(bad)


def _head_text(path: Path) -> str:
    """The module docstring, or else the leading comment block."""
    text = path.read_text()
    doc = ast.get_docstring(ast.parse(text))
    if doc is not None:
        return doc
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


@pytest.mark.parametrize("folder", FOLDERS)
def test_long_files_state_why(folder: str) -> None:
    too_long = []
    for path in sorted((REPO / folder).rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        n = len(path.read_text().splitlines())
        stated = any(r in _head_text(path).lower() for r in LONG_REASONS)
        if n > MAX_LINES and rel not in KNOWN_LONG_FILES_TO_FIX and not stated:
            too_long.append(f"{rel}: {n} lines")
    assert not too_long, (
        f"files over {MAX_LINES} lines; split them or say why in the first docstring "
        f"({' / '.join(LONG_REASONS)}):\n" + "\n".join(too_long)
    )


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_core_never_imports_a_tool() -> None:
    graph, _ = import_graph()
    bad = sorted((m, t) for m, targets in graph.items() if _in(m, CORE) for t in targets if _in(t, LIB_TOOLS))
    assert not bad, "core -> tool imports (move the shared piece into the core, e.g. arm_costs into " \
        f"accounting): {bad}"
    assert not [t for t in graph["mythos.run_dir"] if t.startswith("mythos")], graph["mythos.run_dir"]
