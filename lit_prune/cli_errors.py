"""One shape for every bad input on the command line: ``error: <message>`` on one line, exit code 2, no traceback.

``LIT_PRUNE_DEBUG=1`` re-raises instead, with the full traceback. The messages are the ones our checks raise (they
name the key, the value, what is allowed and how to fix it); this module only digs them out of jsonargparse's
wrappers, suggests the closest key for a mistyped one, and removes run folders that a failed run left empty.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

# Exceptions that mean "the input is wrong", not "the code is wrong": shown as one line.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError,
                                                 IsADirectoryError, PermissionError)

# What jsonargparse adds around a message, per line; never the user's problem.
_NOISE_LINES = re.compile(
    r"^\s*(-\s*)?(Expected a <class 'NoneType'>|Does not validate against any of the Union subtypes|Subtypes: |"
    r"Errors:|Given value type: |Given value: |Problem with given class_path|Parser key \"[^\"]*\":?$|"
    r"Not a valid subclass of|Subclass types expect one of:|Validation failed: .*$)"
)
_UNKNOWN_OPTION = re.compile(r"Option '([^']+)' is not accepted|Key '([^']+)' is not expected|"
                             r"[Uu]nrecognized arguments: (\S+)|No action for key \"([^\"]+)\"|"
                             r"does not accept option '([^']+)'")
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")
_NO_CLASS = re.compile(r"module '([\w.]+)' has no attribute '(\w+)'")


def debug() -> bool:
    return os.environ.get("LIT_PRUNE_DEBUG") == "1"


def one_line(message: str) -> str:
    """The informative part of a (possibly nested, multi-line) error message, joined into one line."""
    lines = [line.strip() for line in str(message).splitlines()]
    kept = [line[2:] if line.startswith("- ") else line for line in lines if line and not _NOISE_LINES.match(line)]
    # Our own checks name the key in backticks: prefer those lines over jsonargparse's framing.
    ours = [line for line in kept if line.startswith("`")]
    return " ".join(ours or kept or [str(message).strip()])


def _class_parameters(class_path: str) -> list[str]:
    """Init parameters of ``class_path`` (following ``**kwargs`` to base classes, as the parser does)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        from jsonargparse._parameter_resolvers import get_signature_parameters

        return [p.name for p in get_signature_parameters(cls, None)]
    except Exception:  # a suggestion is a nicety: never let it hide the error itself
        return []


def parser_keys(parser: Any) -> list[str]:
    """Every ``--dotted.key`` a (jsonargparse) parser and its subcommand parsers accept."""
    keys: list[str] = []
    for action in getattr(parser, "_actions", []):
        keys += [s for s in action.option_strings if s.startswith("--")]
        for sub in (getattr(action, "choices", None) or {}).values() if hasattr(action, "_name_parser_map") else ():
            keys += parser_keys(sub)
    return keys


def suggest(unknown: str, candidates: Iterable[str]) -> str:
    """`` Did you mean --x?`` for the closest candidate, or ``""``."""
    best = difflib.get_close_matches(unknown, list(dict.fromkeys(candidates)), n=1, cutoff=0.6)
    return f" Did you mean {best[0]}?" if best else ""


_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_EXPECTED = re.compile(r"^(?:- )?Expected a (.+?)(?:\. Got value: (.*))?$")


def _type_error(message: str) -> str | None:
    """``key: got V, expected ...`` for a value of the wrong type or outside a Literal, else None."""
    keys = _PARSER_KEY.findall(message)
    expected, value = [], None
    for line in message.splitlines():
        found = _EXPECTED.match(line.strip())
        if found and "NoneType" not in found.group(1):
            what = found.group(1).replace("typing.Literal", "one of ")
            expected.append(what.replace("<class '", "").replace("'>", ""))
            value = found.group(2) if found.group(2) is not None else value
    if not keys or not expected:
        return None
    key = f"{keys[0]}.init_args.{keys[-1]}" if len(keys) > 1 and _CLASS_PATH.search(message) else keys[-1]
    given = re.search(r"^\s*Given value: (.*)$", message, re.M)
    value = value if value is not None else given.group(1) if given else "?"
    return (f"`{key}`: got {value}, expected {' or '.join(expected)}. Fix it in the config or on the command line "
            f"(--{key}=...).")


def explain_parse_error(message: str, parser: Any, argv: list[str]) -> str:
    """One line for a jsonargparse parse error; a mistyped key gets the closest accepted key."""
    missing = _NO_CLASS.search(message)
    if missing:
        module, name = missing.groups()
        groups = _PARSER_KEY.findall(message)
        where = (f"`{groups[0]}.init_args.{groups[-1]}`" if len(groups) > 1 else f"`{groups[0]}.class_path`"
                 if groups else "A class_path")
        try:
            names = [f"{module}.{n}" for n in dir(importlib.import_module(module)) if not n.startswith("_")]
        except Exception:  # the suggestion is a nicety
            names = []
        return f"{where}: there is no class {module}.{name}.{suggest(f'{module}.{name}', names)}"
    found = _UNKNOWN_OPTION.search(message)
    if not found:
        if any(line.strip().lstrip("- ").startswith("`") for line in message.splitlines()):
            return one_line(message)  # our own check's message
        return _type_error(message) or one_line(message)
    unknown = next(g for g in found.groups() if g).split("=")[0].lstrip("-")
    class_path = _CLASS_PATH.search(message)
    if class_path:
        # A key inside a class's init_args, from the command line (--model.init_args.x) or a config file.
        given = next((a.split("=")[0] for a in argv if a.split("=")[0].endswith(f".{unknown}")), None)
        groups = _PARSER_KEY.findall(message)
        group = groups[0] if groups else "model"
        key = given or f"{group}.init_args.{unknown}"
        prefix = key[: -len(unknown)]
        candidates = [prefix + name for name in _class_parameters(class_path.group(1))]
        shown = key if given else f"`{key}`"
        return (f"{shown}: not an option of {class_path.group(1)} (`--{group}.help {class_path.group(1)}` lists "
                f"them).{suggest(key, candidates)}")
    if any(a.split("=")[0] == f"--{unknown}" for a in argv):
        given = f"--{unknown}"
        return f"{given}: unknown option (see --help).{suggest(given, parser_keys(parser))}"
    # From a config file: the same key without the dashes.
    keys = [k[2:] for k in parser_keys(parser)]
    return f"`{unknown}` (in the config): unknown option (see --help).{suggest(unknown, keys)}"


def explain_argparse_error(parser: Any, message: str) -> str:
    """One line for an argparse error of the other commands (export, evaluate, ...), with the closest option."""
    hint = ""
    if "unrecognized arguments:" in message:
        options = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
        unknown = [w.split("=")[0] for w in message.split(":", 1)[1].split() if w.startswith("--")]
        hint = "".join(suggest(u, options) for u in unknown[:1])
    return f"{message}.{hint} `{parser.prog} --help` lists the options."


@contextlib.contextmanager
def one_line_argparse_errors() -> Iterator[None]:
    """Make argparse raise a ``ValueError`` (shown as one ``error:`` line) instead of printing its usage and exiting."""
    original = argparse.ArgumentParser.error

    def error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
        raise ValueError(explain_argparse_error(parser, message))

    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


def _only_startup_files(folder: Path) -> bool:
    """True for a run folder holding nothing a user would miss: an events file, the saved config, hparams (or an
    output folder holding no file at all)."""
    return folder.is_dir() and all(
        p.name.startswith("events.out.tfevents.") or p.name in {"config.yaml", "hparams.yaml"}
        for p in folder.rglob("*") if not p.is_dir()
    )


def first_missing(folder: str | os.PathLike | None) -> Path | None:
    """The topmost folder on the way to ``folder`` that does not exist yet (what a run would create), or None."""
    if folder is None:
        return None
    path = Path(folder).absolute()
    created = None
    while not path.exists():
        created, path = path, path.parent
    return created


def remove_if_left_empty(folder: str | os.PathLike | None, created: Path | None) -> None:
    """Remove ``folder`` and its parents up to ``created`` (see ``first_missing``) when a failed run left them empty."""
    if folder is None or created is None:
        return
    folder = Path(folder).absolute()
    if not _only_startup_files(folder):
        return
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent
    while parent != created.parent and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def exit_with(message: str, code: int = 2) -> None:
    """Print ``error: <message>`` on one line to stderr and exit."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(code)
