import json
from pathlib import Path

import pytest
import torch

from lit_prune.cli import main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def _tiny_overrides(tiny_checkpoint, tiny_text, tmp_path):
    return [
        f"--model.init_args.pretrained={tiny_checkpoint}",
        f"--data.text_files=[{tiny_text}]",
        "--data.max_length=32",
        "--data.batch_size=2",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]


def test_help_lists_subcommands_and_other_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in ("fit", "validate", "test", "export"):
        assert word in out


def test_stage_help_shows_docstring(capsys):
    with pytest.raises(SystemExit):
        main(["validate", "--model.help", "lit_prune.Perplexity"])
    out = " ".join(capsys.readouterr().out.split())
    assert "keeps them and zeroes their residual update" in out


def test_recovery_stage_help_shows_the_shared_settings(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "lit_prune.Distill"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--model.r R LoRA rank.", "--model.kd_share", "--model.teacher TEACHER",
                 "Deprecated: the share of CE"):
        assert text in out


def test_evaluate_stage_is_a_deprecated_alias_of_perplexity():
    import lit_prune
    import lit_prune.stages

    with pytest.deprecated_call(match="renamed `lit_prune.Perplexity`"):
        assert lit_prune.Evaluate is lit_prune.Perplexity
    with pytest.deprecated_call(match="renamed `lit_prune.stages.Perplexity`"):
        assert lit_prune.stages.Evaluate is lit_prune.Perplexity


def test_a_config_with_the_old_stage_name_still_validates(tiny_checkpoint, tiny_text, tmp_path):
    old = tmp_path / "old_eval.yaml"
    old.write_text((CONFIGS[0].parent / "eval_smollm2.yaml").read_text().replace(
        "class_path: lit_prune.Perplexity", "class_path: lit_prune.Evaluate"))
    with pytest.deprecated_call(match="renamed `lit_prune.Perplexity`"):
        cli = main(["validate", "-c", str(old), *_tiny_overrides(tiny_checkpoint, tiny_text, tmp_path),
                    "--model.init_args.dtype=float32", "--trainer.limit_val_batches=1"])
    assert type(cli.model).__name__ == "Perplexity" and cli.trainer.callback_metrics["val/ppl"] > 1


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["validate" if "eval" in config.stem else "fit", "-c", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lit_prune." in printed
    # The model id is linked into the DataModule, not repeated in the data section.
    assert "tokenizer:" not in printed.split("data:")[1].split("trainer:")[0]


def test_validate_reports_ppl_and_masks_agree(tiny_checkpoint, tiny_text, tmp_path):
    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps({"model": str(tiny_checkpoint), "num_layers": 6, "drop": [2, 3]}))
    config = str(Path(__file__).parents[1] / "configs" / "eval_smollm2.yaml")
    base = ["validate", "-c", config, *_tiny_overrides(tiny_checkpoint, tiny_text, tmp_path)]
    dense = main(base).trainer.callback_metrics["val/ppl"]
    dropped = main([*base, f"--model.init_args.mask={mask}"]).trainer.callback_metrics["val/ppl"]
    gated = main([*base, f"--model.init_args.mask={mask}", "--model.init_args.mask_mode=gate"])
    assert torch.isfinite(dense) and dense > 1
    assert not torch.isclose(dense, dropped)
    torch.testing.assert_close(gated.trainer.callback_metrics["val/ppl"], dropped, rtol=1e-4, atol=1e-4)


def test_validate_rejects_mask_for_other_model_before_loading(tiny_checkpoint, tiny_text, tmp_path):
    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps({"model": "org/other", "num_layers": 8, "drop": [1]}))
    config = str(Path(__file__).parents[1] / "configs" / "eval_smollm2.yaml")
    with pytest.raises(ValueError, match="8 decoder layers"):
        main(["validate", "-c", config, *_tiny_overrides(tiny_checkpoint, tiny_text, tmp_path),
              f"--model.init_args.mask={mask}"])


def test_export_command_writes_vanilla_smaller_checkpoint(tiny_checkpoint, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps({"model": str(tiny_checkpoint), "num_layers": 6, "drop": [1, 2, 3]}))
    out = tmp_path / "pruned"
    main(["export", "--model", str(tiny_checkpoint), "--mask", str(mask), "--out", str(out)])
    assert "drop 3/6 layers, segments [1, 4)" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3
    assert AutoTokenizer.from_pretrained(out) is not None
    assert json.loads((out / "mask.json").read_text())["drop"] == [1, 2, 3]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no temporary folder left behind"

    with pytest.raises(FileExistsError, match="not empty"):
        main(["export", "--model", str(tiny_checkpoint), "--mask", str(mask), "--out", str(out)])
    main(["export", "--model", str(tiny_checkpoint), "--mask", str(mask), "--out", str(out), "--overwrite"])


def test_export_writes_nothing_for_a_mask_that_does_not_fit(tiny_checkpoint, tmp_path):
    from lit_prune.components.mask_io import MaskError

    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps({"model": str(tiny_checkpoint), "num_layers": 30, "drop": [13, 14]}))
    out = tmp_path / "pruned"
    with pytest.raises(MaskError, match="30 decoder layers"):
        main(["export", "--model", str(tiny_checkpoint), "--mask", str(mask), "--out", str(out)])
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["mask.json"]


def test_export_rejects_unknown_model(tmp_path):
    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps({"model": "x", "num_layers": 4, "drop": [1]}))
    with pytest.raises(ValueError, match="not a loadable model"):
        main(["export", "--model", str(tmp_path / "missing"), "--mask", str(mask), "--out", str(tmp_path / "o")])
