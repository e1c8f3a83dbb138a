"""README.md and docs/: every Python block parses, every `qdora` command names a real command and
real options, and every file path and link they name exists."""

import ast
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A repository path named in the text: a top-level folder, then a file with an extension.
PATH = re.compile(r"(?<![\w./-])((?:qdora|kernels|eval|tests|docs|\.ci)/[\w./-]*\w\.(?:py|md|png|json|jsonl|sh)"
                  r"|setup\.sh|pyproject\.toml|\.ci/run)(?![\w/])")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def commands(text: str) -> list[str]:
    """The shell commands of indented code blocks, continuation lines joined."""
    out, current = [], ""
    for line in text.splitlines():
        if not line.startswith("    "):
            current = ""
            continue
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        out.append(current)
        current = ""
    return out


def option_strings(argv: list[str]) -> tuple[str, set[str]] | None:
    """The `qdora` subcommand of `argv` and the options its parser accepts."""
    from qdora.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    if argv[0] in ("eval", "analyze", "demo"):  # these own their parsers
        import qdora.demo as demo
        import qdora.eval.harness.analyze as analyze
        import qdora.eval.harness.runner as harness
        module = {"eval": harness, "analyze": analyze, "demo": demo}[argv[0]]
        source = pathlib.Path(module.__file__).read_text()
        options = set(re.findall(r'add_argument\("(--[\w-]+)"', source))
        calls = re.findall(r'add_argument\("(--[\w-]+)"(.*?)\)\n', source, re.S)
        negated = {"--no-" + name[2:] for name, rest in calls  # argparse's --no-X of a BooleanOptionalAction
                   if "BooleanOptionalAction" in rest}
        return argv[0], options | negated
    if argv[0] not in sub.choices:
        return None
    return argv[0], {s for a in sub.choices[argv[0]]._actions for s in a.option_strings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_parse(page):
    for code in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
        ast.parse(code)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_qdora_commands_name_real_options(page):
    checked = 0
    for command in commands(page.read_text()):
        command = command.split(" && ")[-1]
        first = command.split(" ", 1)[0]
        if not (first.endswith("qdora") or first == "torchrun"):
            continue  # other shells' lines, program output
        words = shlex.split(command)
        if first == "torchrun":
            if "--" not in words:
                continue
            args = words[words.index("--") + 1:]
        else:
            args = words[1:]
        if not args or args[0].startswith(("-", "$")) or args[0] == "bench":
            continue  # options of qdora itself, a shell variable, or `bench` (which passes on the rest)
        found = option_strings(args)
        assert found is not None, f"{page.name}: unknown command in {command!r}"
        name, options = found
        unknown = [w for w in args if w.startswith("--") and w.split("=")[0] not in options | {"--debug", "--"}]
        assert not unknown, f"{page.name}: `qdora {name}` has no option {unknown} ({command!r})"
        checked += 1
    if page.name in ("README.md", "cli.md"):
        assert checked >= 5


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_files_and_links_exist(page):
    text = page.read_text()
    for path in PATH.findall(text):
        assert (ROOT / path).exists(), f"{page.name} names {path}, which does not exist"
    for link in LINK.findall(text):
        if "://" in link:
            continue
        assert (page.parent / link).resolve().exists(), f"{page.name} links to {link}, which does not exist"


def test_the_readme_stays_a_guide():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 270, f"README.md has {lines} lines; the details belong in docs/"
