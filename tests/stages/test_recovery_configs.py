"""The recovery configs run end to end on the tiny checkpoint, with the overrides tests/test_configs.py needs."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from lit_prune.cli import main
from lit_prune.teacher_cache_cli import cache_teacher_main

CONFIGS = Path(__file__).parents[2] / "configs"
RECOVERY = ["clp_endpoint_smollm2", "e3_distill_smollm2", "e3_distill_cached_smollm2"]


@pytest.fixture(scope="module")
def tiny_mask(tiny_checkpoint, tmp_path_factory) -> Path:
    # Outside the run folder: the run must write exactly one mask.json of its own (pruned/mask.json).
    path = tmp_path_factory.mktemp("tiny_mask") / "mask.json"
    path.write_text(json.dumps({"model": str(tiny_checkpoint), "num_layers": 6, "drop": [2, 3]}))
    return path


@pytest.fixture(scope="module")
def tiny_cache(tiny_checkpoint, tiny_text, tmp_path_factory) -> Path:
    config = yaml.safe_load((CONFIGS / "e3_distill_cached_smollm2.yaml").read_text())
    out = tmp_path_factory.mktemp("teacher_cache") / "k10"
    cache_teacher_main(["--model", str(tiny_checkpoint), "--text-files", str(tiny_text), "--max-length", "32",
                        "--val-fraction", str(config["data"]["val_fraction"]), "--k", "10", "--out", str(out)])
    return out


@pytest.mark.parametrize("name", RECOVERY)
def test_recovery_config_runs_and_exports(name, tiny_checkpoint, tiny_text, tiny_mask, tiny_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    config = CONFIGS / f"{name}.yaml"
    init_args = yaml.safe_load(config.read_text())["model"]["init_args"]
    args = [
        "fit", "-c", str(config),
        f"--model.init_args.pretrained={tiny_checkpoint}",
        "--model.init_args.dtype=float32",
        "--data.dataset=null",
        f"--data.text_files=[{tiny_text}]",
        "--data.max_length=32",
        "--data.num_workers=0",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32-true",
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=null",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_train_batches=3",  # one short epoch, so validation runs too
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        # The extra overrides of this stage family:
        f"--model.init_args.mask={tiny_mask}",
    ]
    if "teacher" in init_args:
        args.append(f"--model.init_args.teacher={tiny_checkpoint}")
    if "teacher_cache" in init_args:
        args.append(f"--model.init_args.teacher_cache={tiny_cache}")
    cli = main(args)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert torch.isfinite(cli.trainer.callback_metrics["val/ppl"])
    masks = list(tmp_path.rglob("mask.json"))
    assert len(masks) == 1 and masks[0].parent.name == "pruned"
    assert json.loads(masks[0].read_text())["drop"] == [2, 3]
    exported = AutoModelForCausalLM.from_pretrained(masks[0].parent)
    assert exported.config.num_hidden_layers == 4
    if name.startswith("e3_"):
        assert cli.model.temperature == pytest.approx(1.0), "TemperatureSchedule ends the KD temperature at 1"
    if name == "e3_distill_cached_smollm2":
        assert cli.model.teacher_model is None
