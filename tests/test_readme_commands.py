"""Every command line of the README's bash blocks and of each config header works as written (issue 16).

Help lines run for real; the others parse in-process exactly as written: LightningCLI commands with --print_config,
the other commands up to the first step that would read a model or write a file (patched to stop there).
"""

import shlex
import sys
from pathlib import Path

import pytest

from lit_prune.cli import main

ROOT = Path(__file__).parents[1]
PREFIXES = ("python -m lit_prune ", "lit-prune ", "tensorboard ", "make ", "source ")


def _join_and_strip(lines: list[str]) -> list[str]:
    """Join backslash continuations and drop trailing ``# comments``; keep our command lines."""
    commands, current = [], ""
    for line in lines:
        line = line.strip()
        if " #" in line:
            line = line[: line.index(" #")].rstrip()
        current += line
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
            continue
        if current.startswith(PREFIXES):
            commands.append(" ".join(current.split()))
        current = ""
    return commands


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = [b.split("\n", 1)[1] for b in text.split("```bash")[1:]]
    return _join_and_strip([line for b in blocks for line in b.split("```")[0].splitlines()])


def config_commands() -> list[tuple[str, str]]:
    found = []
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        header = []
        for line in config.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line.lstrip("#").strip().removeprefix("-> "))
        found += [(config.stem, c) for c in _join_and_strip(header)]
    return found


COMMANDS = [("README", c) for c in readme_commands()] + config_commands()


class Parsed(Exception):
    """Raised by the patched first heavy step: the command line was accepted."""


def test_the_walk_finds_the_commands():
    lines = [c for _, c in COMMANDS]
    assert any(c.startswith("python -m lit_prune evaluate ") and "--out" in c for c in lines)
    assert any(c.startswith("source .venv/bin/activate") for c in lines)
    assert sum(c.startswith("python -m lit_prune fit -c configs/") for c in lines) >= 20


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_command_works_as_written(where, command, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    words = shlex.split(command)
    if words[0] == "make":
        assert f"\n{words[1]}:" in (ROOT / "Makefile").read_text()
        return
    if words[0] == "source":
        assert words[1] == ".venv/bin/activate"
        assert (ROOT / "Makefile").read_text().count("VENV ?= .venv") == 1
        return
    if words[0] == "tensorboard":
        assert (Path(sys.executable).parent / "tensorboard").is_file(), "tensorboard is not installed beside python"
        return
    argv = words[3:] if words[0] == "python" else words[1:]
    if "--help" in argv or "-h" in argv:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out.lower()
        return
    if argv[0] in ("fit", "validate", "test"):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--print_config"])
        assert exit_info.value.code == 0 and "class_path: lit_prune." in capsys.readouterr().out
        return

    def stop(*args, **kwargs):
        raise Parsed

    import lit_prune.assets
    import lit_prune.components.mask_io
    import lit_prune.components.quantize
    import lit_prune.evaluate_models
    import lit_prune.io

    monkeypatch.setattr(lit_prune.components.mask_io, "load_mask", stop)  # export
    monkeypatch.setattr(lit_prune.evaluate_models, "evaluate", stop)
    monkeypatch.setattr(lit_prune.components.quantize, "quantize_checkpoint", stop)
    monkeypatch.setattr(lit_prune.io, "prepare_output_dir", stop)  # cache-teacher
    monkeypatch.setattr(lit_prune.assets, "assets_main", stop)
    with pytest.raises(Parsed):
        main(argv)
