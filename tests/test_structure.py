"""The package's import structure, read from the source with `ast`: no import cycles between qdora's
modules (imports inside functions included), and the library never imports the harness and
benchmarks (`qdora.eval`) or the command line (`qdora.cli`)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = (("qdora", "qdora"), ("kernels", "qdora.kernels"), ("eval", "qdora.eval"))


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for folder, package in PACKAGES:
        for source in (ROOT / folder).glob("*.py"):
            modules[package if source.stem == "__init__" else f"{package}.{source.stem}"] = source
    graph = {}
    for name, source in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qdora"):
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    targets.add(child if child in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names if alias.name.startswith("qdora"))
        graph[name] = {t for t in targets if t in modules and t not in (name, "qdora")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30  # every module was read
    assert cycles(graph) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_does_not_import_the_harness_or_the_cli():
    graph = import_graph()
    library = [m for m in graph if not m.startswith("qdora.eval") and m != "qdora.cli"]
    wrong = {m: sorted(t for t in graph[m] if t.startswith("qdora.eval") or t == "qdora.cli") for m in library}
    assert {m: t for m, t in wrong.items() if t} == {}


def test_imports_inside_functions_say_why():
    """An import inside a function is for an optional or heavy dependency, and says so in a comment
    on its line (qdora/cli.py imports each command's modules lazily; its docstring says why)."""
    silent = []
    for folder, _ in PACKAGES:
        for source in sorted((ROOT / folder).glob("*.py")):
            if source.name == "cli.py":
                continue
            lines = source.read_text().splitlines()
            tree = ast.parse("\n".join(lines))
            functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for node in {n for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}:
                if "#" not in lines[node.lineno - 1]:
                    silent.append(f"{folder}/{source.name}:{node.lineno}")
    assert silent == []
