"""Architecture rules, checked statically (``ast``, nothing is imported):

1. The import graph of ``mythos/``, ``data_prep/``, ``launch/`` and ``bench/`` is a DAG, counting
   imports inside functions too (a function-level import hides a cycle, it does not remove it).
2. The library does not depend on the tools: ``mythos.*`` imports nothing from ``data_prep``,
   ``launch``, ``bench`` or ``tests``.
3. No ``.py`` file is longer than ``MAX_LINES`` unless its first docstring or comment says why
   (contains "long because" or "over 450 lines:").
4. ``mythos/`` is layered (``LAYERS``, lowest first): the core (config, run directory,
   distributed, I/O, CLI helpers, FLOPs accounting, weights, the model, data and training
   packages: every module outside the higher layers), then the features with their own CLI built
   on it (``mythos.eval``, ``mythos.tasks``), then the tools (``mythos.tools``: planner, compare,
   experiment report, export, the HF code, the FLOPs table). A module imports only from its own
   layer or below, not even inside a function; :mod:`mythos.run_dir`, which every layer uses,
   imports nothing of mythos; and ``mythos/`` holds no top-level module the core does not own.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("mythos", "data_prep", "launch", "bench")
TOOLS = ("data_prep", "launch", "bench", "tests")
MAX_LINES = 450
#: ``mythos``'s layers above the core, lowest first; the core is every mythos module outside them
LAYERS = (("mythos.eval", "mythos.tasks"), ("mythos.tools",))
#: the core's top-level modules and packages (a new one is a decision: core, or a tool?)
CORE_TOP = {"mythos", "mythos.accounting", "mythos.cli_common", "mythos.config", "mythos.dist", "mythos.ds_checkpoint",
            "mythos.io", "mythos.run_dir", "mythos.weights", "mythos.configs", "mythos.data", "mythos.model",
            "mythos.train"}
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


def layer_of(module: str) -> int:
    """0 for the core, ``k`` for a module of ``LAYERS[k - 1]``."""
    for k, packages in enumerate(LAYERS, start=1):
        if _in(module, packages):
            return k
    return 0


def layer_violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """``(module, target)`` for every mythos import that climbs to a higher layer."""
    return sorted((m, t) for m, targets in graph.items() if m.startswith("mythos")
                  for t in targets if t.startswith("mythos") and layer_of(t) > layer_of(m))


def test_no_module_imports_a_layer_above_its_own() -> None:
    graph, _ = import_graph()
    bad = layer_violations(graph)
    assert not bad, "imports that climb a layer (move the shared piece down, e.g. arm_costs into accounting, " \
        f"consolidated weights into mythos.weights): {bad}"
    assert not [t for t in graph["mythos.run_dir"] if t.startswith("mythos")], graph["mythos.run_dir"]


def test_mythos_top_level_holds_only_the_core_and_the_layer_packages() -> None:
    top = {".".join(m.split(".")[:2]) for m in _sources() if m.startswith("mythos")}
    top |= {f"mythos.{p.name}" for p in (REPO / "mythos").iterdir() if p.is_dir() and not p.name.startswith("__")}
    layered = {p for packages in LAYERS for p in packages}
    assert top - CORE_TOP - layered == set(), "new top-level mythos module: add it to CORE_TOP or move it under " \
        f"mythos/tools/: {sorted(top - CORE_TOP - layered)}"


def test_the_layer_check_sees_a_climbing_import() -> None:
    graph = {"mythos.train.trainer": {"mythos.tools.compare"}, "mythos.eval.cli": {"mythos.tools.export"},
             "mythos.tools.compare": {"mythos.eval.multihop", "mythos.train.audit"}}
    assert layer_violations(graph) == [("mythos.eval.cli", "mythos.tools.export"),
                                       ("mythos.train.trainer", "mythos.tools.compare")]


def _mapped_modules(design: str) -> set[str]:
    """The ``mythos/``-relative files the module map of docs/design.md names: in each table row
    the first cell's first path gives the folder of the bare names after it
    (`` `train/config.py`, `checks.py` `` -> ``train/config.py``, ``train/checks.py``)."""
    section = design[design.index("### Module map"):]
    section = section[: section.index("\n## ")]
    mapped = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        names = re.findall(r"`([^`]+\.py)`", line.split(" | ")[0])
        folder = names[0].rpartition("/")[0] if names else ""
        mapped |= {n if "/" in n else (f"{folder}/{n}" if folder else n) for n in names}
    return mapped


def test_design_doc_maps_every_module() -> None:
    files = {p.relative_to(REPO / "mythos").as_posix() for p in (REPO / "mythos").rglob("*.py")
             if p.name not in ("__init__.py", "__main__.py")}
    missing = sorted(files - _mapped_modules((REPO / "docs" / "design.md").read_text()))
    assert not missing, f"docs/design.md's module map does not name: {missing}"
