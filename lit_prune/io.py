"""Writing outputs: one atomic write, one permission rule, one "save a checkpoint folder".

Everything lit_prune writes (``mask.json``, exported and quantized checkpoints, teacher caches, results files) goes
through :func:`write_atomically`: the content is written into a temporary sibling and renamed into place, so a crash
or an error never leaves a half-written output behind. The one permission rule: what we write is readable like any
file ``open()`` creates, i.e. ``0o666`` (files) / ``0o777`` (folders) minus the umask, typically 0644 / 0755. Temporary
files are owner-only, and some writers (safetensors) create 0600 files, so the rule is applied to the whole tree
before the rename.

This module depends on the standard library only; every layer (components, stages, callbacks, CLI tools) uses it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def prepare_output_dir(out_dir: str | Path, overwrite: bool = False, key: str = "out") -> Path:
    """Refuse a non-empty output folder unless ``overwrite`` (checked before any work is done)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"`{key}`={str(out_dir)!r} exists and is not a folder. Choose another path.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"`{key}`={str(out_dir)!r} is not empty. Choose an empty or new folder, or pass overwrite to replace it."
        )
    return out_dir


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(path: str | Path) -> None:
    """Give ``path`` (and everything under a folder) the mode ``open()``/``mkdir()`` would: 0o666/0o777 minus umask."""
    umask = current_umask()
    path = Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        if item.is_symlink():
            continue
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def write_atomically(path: str | Path, write: Callable[[Path], Any], folder: bool = False) -> Path:
    """Create ``path`` with ``write(tmp)`` on a temporary sibling, apply the permission rule, rename it into place.

    Args:
        path: The file or folder to create; an existing one is replaced only once the new one is complete.
        write: Called with the temporary path: a new, empty folder when ``folder``, else a file path to write.
        folder: Whether ``path`` is a folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        write(tmp)
        make_readable(tmp)
        if folder and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write a text file (UTF-8) atomically, with the permission rule of :func:`write_atomically`."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_atomically(out_dir: str | Path, write: Callable[[Path], Any], overwrite: bool = False,
                    key: str = "out") -> Path:
    """Fill a new output folder with ``write(tmp_dir)``; a non-empty ``out_dir`` is refused unless ``overwrite``."""
    out_dir = prepare_output_dir(out_dir, overwrite, key=key)
    return write_atomically(out_dir, write, folder=True)


def save_checkpoint_folder(
    out_dir: str | Path,
    model: Any | Callable[[Path], Any],
    tokenizer: Any = None,
    mask_json: str | None = None,
    overwrite: bool = False,
    key: str = "out",
) -> Path:
    """Save a self-contained checkpoint folder atomically: ``model`` + ``tokenizer`` + ``mask.json``.

    Args:
        out_dir: Destination folder; must be empty or new unless ``overwrite``.
        model: Anything with ``save_pretrained(folder)``; or a callable that gets the temporary folder and returns
            the model to save (to write something first, e.g. a LoRA adapter, and then merge it).
        tokenizer: Saved next to the weights (``save_pretrained``) so the folder loads on its own.
        mask_json: Text of the folder's ``mask.json`` (``MaskArtifact.to_json()``), or None for none.
        overwrite: Replace a non-empty ``out_dir``.
        key: The option that named ``out_dir``, for the error message.
    """

    def write(folder: Path) -> None:
        to_save = model if hasattr(model, "save_pretrained") else model(folder)
        to_save.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if mask_json is not None:
            (folder / "mask.json").write_text(mask_json, encoding="utf-8")

    return save_atomically(out_dir, write, overwrite, key=key)
