"""The import graph of the three packages keeps the layering of DESIGN.md: no cycle between modules, and imports run
one way, quantizer (neuqi_export) <- converters / runtimes <- CLI (neuqi_export.cli, the one place they meet).

Every `import` / `from ... import` in a module counts, at any depth (a function-level import is a dependency too).
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("neuqi_export", "converters", "runtimes")
CLI = "neuqi_export.cli"


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _targets(mod: str, path: Path, node, mods) -> list[str]:
    """The project modules an import statement in `mod` loads (the deepest module each name resolves to)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
            pkg = pkg[: len(pkg) - node.level + 1]
            base = ".".join(pkg + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = []
    for name in names:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name and name != mod:
            out.append(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[mod].update(_targets(mod, path, node, mods))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def _top(mod: str) -> str:
    return mod.split(".")[0]


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports against the layering: the quantizer (outside its CLI package) importing a converter or a runtime,
    converters and runtimes importing each other or the CLI."""
    bad = []
    for mod, deps in graph.items():
        in_cli = mod == CLI or mod.startswith(CLI + ".")
        for dep in deps:
            if _top(mod) == "neuqi_export" and not in_cli and _top(dep) in ("converters", "runtimes"):
                bad.append((mod, dep))
            elif _top(mod) in ("converters", "runtimes") and (
                    (_top(dep) != _top(mod) and _top(dep) != "neuqi_export") or dep == CLI or dep.startswith(CLI + ".")):
                bad.append((mod, dep))
    return sorted(bad)


def test_the_checker_finds_a_cycle_and_an_upward_import():
    graph = {"neuqi_export.a": {"neuqi_export.b"}, "neuqi_export.b": {"neuqi_export.a", "converters.x"},
             "converters.x": {"runtimes.y"}, "runtimes.y": set(), "neuqi_export.cli.m": {"converters.x"}}
    assert cycles(graph) == [["neuqi_export.a", "neuqi_export.b"]]
    assert upward(graph) == [("converters.x", "runtimes.y"), ("neuqi_export.b", "converters.x")]


def test_relative_imports_resolve_to_the_modules_they_load():
    graph = import_graph()
    assert "neuqi_export.cli.parser" in graph["neuqi_export.cli.main"]  # from .parser import build_parser
    assert "neuqi_export.master_store" in graph["neuqi_export.master"]  # a function-level import counts
    assert "neuqi_export.grids" in graph["converters.gguf.lattice"]  # from neuqi_export import grids
    assert len(graph) > 60


def test_no_import_cycle_and_imports_run_one_way():
    graph = import_graph()
    found, bad = cycles(graph), upward(graph)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports; cycles: {found or 'none'}; "
          f"imports against the layering: {bad or 'none'}")
    assert not found, f"import cycles: {found}"
    assert not bad, f"imports against quantizer <- converters/runtimes <- cli: {bad}"
