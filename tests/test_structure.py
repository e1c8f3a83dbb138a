"""The package's structure, read from the source with `ast`: qdora's wings (`qdora/<wing>/`) in their
order, each importing only its own and lower wings; `qdora.eval`'s folders likewise; no import cycles
(imports inside functions included); the library never imports the harness and benchmarks
(`qdora.eval`) or the command line; and a name another module imports is public (no leading `_`)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = (("qdora", "qdora"), ("kernels", "qdora.kernels"), ("eval", "qdora.eval"))
WINGS = ("core", "models", "data", "train", "export", "integrations", "plan", "serve")
"""qdora's wings, lowest first: a module imports from its own wing and the wings before it."""
TOP = ("qdora", "qdora.cli", "qdora.demo", "qdora.options")
"""The modules above the wings (the command line, the demo, the options they share)."""
EVAL_FOLDERS = ("bench", "harness", "plan", "gpu")
"""`qdora.eval`'s folders, lowest first; `qdora.eval.common` is below them all."""


def sources() -> dict[str, pathlib.Path]:
    """Every module (`qdora.train.loop`) and its file; a package by its `__init__.py`."""
    modules = {}
    for folder, package in PACKAGES:
        for source in sorted((ROOT / folder).rglob("*.py")):
            parts = source.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join((package, *parts))] = source
    return modules


def imports(source: pathlib.Path) -> list[ast.ImportFrom | ast.Import]:
    return [n for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]


def import_graph() -> dict[str, set[str]]:
    modules = sources()
    graph = {}
    for name, source in modules.items():
        targets = set()
        for node in imports(source):
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


def rank(module: str) -> tuple[str, int] | None:
    """(area, position) of a module: ("wing", i) for qdora's wings, ("eval", i) for the harness's
    folders (-1: `qdora.eval` and `qdora.eval.common`), None for the top and `qdora.kernels`."""
    parts = module.split(".")
    if parts[1:2] == ["eval"]:
        return ("eval", EVAL_FOLDERS.index(parts[2]) if len(parts) > 2 and parts[2] in EVAL_FOLDERS else -1)
    if len(parts) > 1 and parts[1] in WINGS:
        return ("wing", WINGS.index(parts[1]))
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 60  # every module was read, in every folder
    assert cycles(graph) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_lives_in_a_wing_or_at_the_top():
    library = [m for m in sources() if not m.startswith(("qdora.eval", "qdora.kernels", "qdora.demo_data"))]
    assert sorted(m for m in library if m not in TOP and rank(m) is None) == []
    assert {m.split(".")[1] for m in library if rank(m)} == set(WINGS)
    evaluation = [m for m in sources() if m.startswith("qdora.eval.")]
    assert sorted(m for m in evaluation if m != "qdora.eval.common" and rank(m)[1] < 0) == []


def upward(graph: dict[str, set[str]]) -> list[str]:
    """The imports that climb: a wing importing a higher wing or the top, or a folder of `qdora.eval`
    importing a higher one. (The top and `qdora.eval` may import any wing.)"""
    wrong = []
    for module, targets in graph.items():
        mine = rank(module)
        for target in sorted(targets):
            theirs = rank(target)
            if mine is None or target.startswith("qdora.kernels"):
                continue
            if mine[0] == "wing" and (theirs is None or theirs[0] != "wing" or theirs[1] > mine[1]):
                wrong.append(f"{module} -> {target}")
            if mine[0] == "eval" and theirs is not None and theirs[0] == "eval" and theirs[1] > mine[1]:
                wrong.append(f"{module} -> {target}")
    return wrong


def test_lower_wings_never_import_higher_ones():
    assert upward(import_graph()) == []


def test_the_order_check_finds_an_upward_import():
    assert rank("qdora.core.layer") == ("wing", 0) and rank("qdora.train.loop") == ("wing", 3)
    assert rank("qdora.eval.gpu.check") == ("eval", 3) and rank("qdora.eval.common") == ("eval", -1)
    assert rank("qdora.cli") is None
    graph = {"qdora.core.layer": {"qdora.train.loop", "qdora.core.nf4", "qdora.kernels.ops"},
             "qdora.models.loading": {"qdora.options"}, "qdora.export.merge": {"qdora.models.loading"},
             "qdora.eval.bench.layer": {"qdora.eval.gpu.report", "qdora.eval.common"}, "qdora.cli": {"qdora.plan"}}
    assert upward(graph) == ["qdora.core.layer -> qdora.train.loop", "qdora.models.loading -> qdora.options",
                             "qdora.eval.bench.layer -> qdora.eval.gpu.report"]


def test_the_library_does_not_import_the_harness_or_the_cli():
    graph = import_graph()
    library = [m for m in graph if not m.startswith("qdora.eval") and m != "qdora.cli"]
    wrong = {m: sorted(t for t in graph[m] if t.startswith("qdora.eval") or t == "qdora.cli") for m in library}
    assert {m: t for m, t in wrong.items() if t} == {}


def test_each_wing_says_what_it_owns_and_what_it_may_import():
    for folder in [ROOT / "qdora" / w for w in WINGS] + [ROOT / "eval" / f for f in EVAL_FOLDERS]:
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
        assert "may import" in doc and len(doc) > 150, folder


def test_names_used_by_another_module_are_public():
    """A name another module imports (the tests included) has no leading underscore: what is used
    across modules is the module's interface, not its inside."""
    private = []
    for source in [*sources().values(), *sorted((ROOT / "tests").glob("*.py"))]:
        for node in imports(source):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qdora"):
                private += [f"{source.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert private == []


def test_imports_inside_functions_say_why():
    """An import inside a function is for an optional or heavy dependency, and says so in a comment
    on its line (qdora/cli.py imports each command's modules lazily; its docstring says why)."""
    silent = []
    for source in sources().values():
        if source == ROOT / "qdora" / "cli.py":
            continue
        lines = source.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in {n for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}:
            if "#" not in lines[node.lineno - 1]:
                silent.append(f"{source.relative_to(ROOT)}:{node.lineno}")
    assert silent == []
