"""Distill with a v2 teacher cache: other training data is refused in setup, before any weights load."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_prune import Distill
from lit_prune.components.teacher_cache import TeacherCacheError, write_topk_cache
from lit_prune.data import PruneDataModule, collate_blocks


@pytest.fixture(scope="module")
def tiny_mask(tiny_checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mask") / "mask.json"
    path.write_text(json.dumps({"model": str(tiny_checkpoint), "num_layers": 6, "drop": [2, 3]}))
    return path


def _data(tiny_checkpoint, text_file) -> PruneDataModule:
    return PruneDataModule(tokenizer=str(tiny_checkpoint), text_files=[str(text_file)], max_length=32, batch_size=2,
                           val_fraction=0.2)


def test_a_cache_of_other_data_is_refused_in_setup_before_weights_load(
    tiny_checkpoint, tiny_mask, tiny_text, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM

    data = _data(tiny_checkpoint, tiny_text)
    data.setup("fit")
    loader = torch.utils.data.DataLoader(data.train_set, batch_size=8, collate_fn=collate_blocks)
    cache = write_topk_cache(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), loader, tmp_path / "cache", k=4,
                             model_id=str(tiny_checkpoint))
    other = tmp_path / "other.txt"
    other.write_text(tiny_text.read_text().upper())
    import lit_prune.hf as hf

    monkeypatch.setattr(hf, "load_causal_lm", lambda *a, **k: pytest.fail("no weights may load"))
    module = Distill(str(tiny_checkpoint), mask=str(tiny_mask), teacher_cache=str(cache),
                     optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    assert module.cache.variant == "tail"
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    with pytest.raises(TeacherCacheError, match="lacks .* training blocks"):
        trainer.fit(module, datamodule=_data(tiny_checkpoint, other))
    with pytest.raises(ValueError, match="topk. cache.*cannot give the `model.init_args.cache_variant: sampled`"):
        Distill(str(tiny_checkpoint), mask=str(tiny_mask), teacher_cache=str(cache), cache_variant="sampled")
