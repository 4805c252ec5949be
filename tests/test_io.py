"""lit_prune.io: atomic writes, one permission rule, the checkpoint folder; lit_prune.hf: the loadable-model check."""

from __future__ import annotations

import os

import pytest
from tiny import char_tokenizer, tiny_model
from transformers import AutoModelForCausalLM

from lit_prune.components.mask_io import MaskArtifact, load_mask
from lit_prune.io import current_umask, save_checkpoint_folder, write_text_atomically


def _modes(folder) -> dict[str, int]:
    return {p.name: p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_folder_is_readable_like_any_created_file(tmp_path, umask):
    artifact = MaskArtifact(model="tiny", num_layers=6, drop=[2])
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        out = save_checkpoint_folder(tmp_path / "out", tiny_model("llama"), char_tokenizer(), artifact.to_json())
    finally:
        os.umask(old)
    modes = _modes(out)
    # safetensors writes its file owner-only (0600); the folder must not keep that, nor mkdtemp's 0700.
    assert modes.pop("out") == 0o777 & ~umask
    assert "model.safetensors" in modes and "tokenizer.json" in modes
    assert modes == {name: 0o666 & ~umask for name in modes}
    assert load_mask(out / "mask.json") == artifact
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 6
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary sibling left


def test_model_callable_runs_inside_the_temporary_folder(tmp_path):
    model = tiny_model("llama")

    def merged(folder):
        (folder / "adapter").mkdir()
        (folder / "adapter" / "note.txt").write_text("written first")
        return model

    out = save_checkpoint_folder(tmp_path / "out", merged)
    assert (out / "adapter" / "note.txt").read_text() == "written first"
    assert (out / "adapter" / "note.txt").stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert not (out / "mask.json").exists()


def test_a_failed_write_leaves_nothing_and_keeps_the_old_output(tmp_path):
    class Broken:
        def save_pretrained(self, folder):
            (folder / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint_folder(tmp_path / "new", Broken())
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"`out`=.*not empty"):
        save_checkpoint_folder(tmp_path / "old", tiny_model("llama"))
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint_folder(tmp_path / "old", Broken(), overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert (tmp_path / "old" / "keep.txt").read_text() == "keep"


def test_text_file_is_replaced_atomically_with_the_umask_mode(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_text_atomically(path, "{}\n")
    write_text_atomically(path, '{"a": 1}\n')
    assert path.read_text() == '{"a": 1}\n'
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_not_a_loadable_model_names_the_key(tmp_path):
    from lit_prune import hf

    with pytest.raises(ValueError, match=r"`--teacher`='.*nowhere' is not a loadable model: .*offline:smollm2-135m"):
        hf.load_config(str(tmp_path / "nowhere"), key="--teacher")

    class Custom(ValueError):
        pass

    with pytest.raises(Custom, match="Try a folder."):
        hf.read_config(str(tmp_path / "nowhere"), key="--model", hint="Try a folder.", error=Custom)
