"""Command-line options and config files generated from a config dataclass, so that a setting is
written once: as a field with its default and its docstring (see `qdora.train.loop.TrainConfig`).

Each field `name` becomes `--name-with-dashes` (a bool that defaults to True becomes
`--no-name-with-dashes`, one that defaults to False `--name-with-dashes`), with the field's
docstring as its help, its type from the annotation, and `CHOICES[name]` as choices. A tuple field
is given comma-separated. `--config FILE` (JSON, or YAML) gives any field by its option name
(dashes or underscores); a flag given on the command line overrides the file.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import json
import os
import textwrap
from pathlib import Path
from typing import Any

IGNORED_KEYS = frozenset({"fingerprints"})
"""Keys a run's own `train_config.json` holds beside the settings (so it can be given as --config)."""


def nearest(word: str, known, quote: bool = False) -> str:
    """' (did you mean X?)' for the known word closest to a mistyped `word`, or ''."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close and quote else f" (did you mean {close[0]}?)" if close else ""


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose error for an unknown option names the nearest known one (its
    subcommands' parsers are of this class too)."""

    def options(self) -> list[str]:
        found = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += [o for sub in action.choices.values() if isinstance(sub, Parser) for o in sub.options()]
        return found

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            known = self.options()
            hints = [f"{arg}{nearest(arg.split('=')[0], known)}" for arg in message.split(":", 1)[1].split()]
            message = "unrecognized arguments: " + " ".join(hints)
        super().error(message)


def field_docs(cls) -> dict[str, str]:
    """Each field's docstring (the string literal right after it in the class body), one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = next(node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)).body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    fields = {f.name for f in dataclasses.fields(cls)}
    return {name: doc for name, doc in docs.items() if name in fields}


def _kind(field: dataclasses.Field) -> str:
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    if annotation.startswith("tuple"):
        return "tuple"
    return annotation


def file_value(kind: str, value: Any) -> Any:
    """A --config file's `value` for a field of `kind` (bool, int, float, str), as the command line
    would give it, or ValueError saying what was expected. YAML reads `2e-4` as a string (its floats
    need a dot): a number written as a string is taken as the number. A bool is true or false only:
    the string "false" is not taken as either (Python would call it true)."""
    if value is None or kind == "tuple":
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {value!r}")
    if kind in ("int", "float"):
        if isinstance(value, str):
            try:
                value = float(value.strip()) if kind == "float" else int(value.strip())
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        if kind == "int":
            if value != int(value):
                raise ValueError(f"expected a whole number, got {value!r}")
            return int(value)
        return float(value)
    if kind == "str" and isinstance(value, (bool, list, dict)):
        raise ValueError(f"expected text, got {value!r}")
    return str(value) if kind == "str" else value


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """Add one option per field of dataclass `cls`, and `--config`. Options default to "not given"
    (argparse.SUPPRESS): `resolve` tells what the command line set from what the file or the
    dataclass did."""
    docs = field_docs(cls)
    choices = getattr(cls, "CHOICES", {})
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="a JSON or YAML file of settings, keys = option names (a run's train_config.json "
                             "works); flags given here override it")
    for field in dataclasses.fields(cls):
        kind, help_text = _kind(field), docs.get(field.name, "")
        if kind == "bool":
            if field.default:
                parser.add_argument("--no-" + field.name.replace("_", "-"), dest=field.name, action="store_false",
                                    default=argparse.SUPPRESS, help=f"turn off: {help_text}")
            else:
                parser.add_argument(option_name(field.name), dest=field.name, action="store_true",
                                    default=argparse.SUPPRESS, help=help_text)
            continue
        if _required(field):
            help_text += " (required, here or in --config)"
        elif kind == "tuple":
            help_text += f" (default: {','.join(field.default) or 'none'})"
        else:
            help_text += f" (default: {field.default})"
        convert = {"int": int, "float": float}.get(kind, str)
        parser.add_argument(option_name(field.name), dest=field.name, type=convert, default=argparse.SUPPRESS,
                            choices=choices.get(field.name), help=help_text.replace("%", "%%"))


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings in a JSON or YAML file, keyed as written."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: file not found")
    text = path.read_text()
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        if is_yaml:
            import yaml  # a dependency of transformers
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # json's and yaml's own error types
        raise ValueError(f"--config {path}: not valid {'YAML' if is_yaml else 'JSON'} ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def _key_name(key) -> str:
    """The field a config file's key names (`--max-steps`, `max-steps` and `max_steps` alike)."""
    return str(key).lstrip("-").replace("-", "_")


def resolve(cls, given: dict[str, Any], ignore: frozenset[str] = frozenset(), aliases: dict[str, str] | None = None):
    """The dataclass instance for settings `given` by the command line (`vars(args)`, only the flags
    that were given, plus `config`): the dataclass's defaults, then the file's values, then the
    flags. Unknown keys, and missing required fields, are one error listing every problem; the
    values themselves are checked by the dataclass. A file's keys in `ignore` are skipped (the
    settings of another command a file may hold: `qdora plan --config RUN/train_config.json`); a
    key in `aliases` gives the field it names there, unless the file gives that field itself
    (train's `cutoff_len` is plan's `seq_len`)."""
    given = dict(given)
    given.pop("func", None)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    problems = []
    source = given.pop("config", None)
    if source is not None:
        data = read_config_file(source)
        named = {_key_name(key) for key in data}
        for key, value in data.items():
            name = _key_name(key)
            if (aliases or {}).get(name, name) not in named:
                name = aliases[name]
            if name in IGNORED_KEYS or name in ignore:
                continue
            if name not in fields:
                problems.append(f"--config {source}: unknown setting {key!r}{nearest(name, fields, quote=True)}")
                continue
            try:
                values[name] = file_value(_kind(fields[name]), value)
            except ValueError as err:
                problems.append(f"--config {source}: {key}: {err}")
    values.update({k: v for k, v in given.items() if k in fields})
    for name, value in values.items():
        if _kind(fields[name]) == "tuple":
            if isinstance(value, str):  # comma-separated, on the command line or in the file
                value = value.split(",")
            if not isinstance(value, (list, tuple)):
                problems.append(f"{option_name(name)}: expected a list or a comma-separated string, got {value!r}")
                continue
            values[name] = tuple(str(v).strip() for v in value if str(v).strip())
    missing = [option_name(n) for n, f in fields.items() if _required(f) and n not in values]
    if missing:
        problems.append(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (on the command line "
                        "or in --config)")
    if problems:
        known = ", ".join(option_name(n)[2:] for n in fields)
        raise ValueError("invalid settings:\n  - " + "\n  - ".join(problems)
                         + (f"\nknown settings: {known}" if any("unknown setting" in p for p in problems) else ""))
    return cls(**values)
