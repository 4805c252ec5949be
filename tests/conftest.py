"""Shared fixtures: offline environment, tiny random models of every supported architecture, a tiny corpus."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Tests never reach a hub; set before transformers/datasets are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
if "HF_HOME" not in os.environ:
    # A private, throw-away HF home (each pytest process made one and left it behind before).
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="lit_prune_hf_home_")
    atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from tiny import TINY_TEXT, char_tokenizer, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 6-layer random Llama with a character tokenizer, saved like any HF checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    char_tokenizer().save_pretrained(path)
    tiny_model("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    """A small plain-text corpus (about 8k characters)."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(TINY_TEXT * 24)
    return path


@pytest.fixture()
def cpu_trainer_kwargs(tmp_path) -> dict:
    return dict(
        accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, default_root_dir=str(tmp_path), logger=False,
    )
