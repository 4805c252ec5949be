"""Every shipped config runs a few steps with its model swapped for a tiny local one (litgpt's config-hub test)."""

import json
from pathlib import Path

import pytest
import yaml

from lit_prune.cli import main

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# Mixture-of-experts configs run on a tiny model of their own architecture (tests/tiny.py), the rest on tiny Llama.
TINY_MODEL_TYPES = {"e3_deepseek_r1": "deepseek_v3", "e3_qwen3_30b_a3b": "qwen3_moe", "clp_gemma3_270m": "gemma3_text"}


@pytest.fixture(scope="session")
def tiny_checkpoint_of(tmp_path_factory):
    from tiny import char_tokenizer, tiny_model

    def save(model_type: str) -> Path:
        path = tmp_path_factory.mktemp(f"tiny-{model_type}")
        char_tokenizer().save_pretrained(path)
        tiny_model(model_type).save_pretrained(path)
        return path

    return save


@pytest.fixture(scope="session")
def tiny_mask(tiny_checkpoint, tmp_path_factory) -> Path:
    # Outside tmp_path: each run must write exactly one mask.json of its own.
    path = tmp_path_factory.mktemp("tiny_mask") / "mask.json"
    path.write_text(json.dumps({"model": str(tiny_checkpoint), "num_layers": 6, "drop": [2, 3]}))
    return path


@pytest.fixture(scope="session")
def tiny_teacher_cache(tiny_checkpoint, tiny_text, tmp_path_factory) -> Path:
    from lit_prune.teacher_cache_cli import cache_teacher_main

    # The cache the shipped cached config reads (its K and kind).
    shipped = yaml.safe_load((ROOT / "configs" / "e3_distill_cached_smollm2.yaml").read_text())["model"]["init_args"]
    kind = "sampled" if shipped["cache_variant"] == "sampled" else "topk"
    out = tmp_path_factory.mktemp("teacher_cache") / f"{kind}{shipped['teacher_k']}"
    cache_teacher_main(["--model", str(tiny_checkpoint), "--text-files", str(tiny_text), "--max-length", "32",
                        "--val-fraction", "0.1", "--k", str(shipped["teacher_k"]), "--kind", kind, "--out", str(out)])
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_on_tiny_model(config, tiny_checkpoint, tiny_text, tmp_path, request):
    raw = yaml.safe_load(config.read_text())
    stage = raw["model"]["class_path"]
    model_type = TINY_MODEL_TYPES.get(config.stem)
    pretrained = request.getfixturevalue("tiny_checkpoint_of")(model_type) if model_type else tiny_checkpoint
    args = [
        "validate" if stage == "lit_prune.Perplexity" else "fit",
        "-c", str(config),
        f"--model.init_args.pretrained={pretrained}",
        "--model.init_args.dtype=float32",
        "--data.dataset=null",
        f"--data.text_files=[{tiny_text}]",
        "--data.max_length=32",
        "--data.num_workers=0",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.num_nodes=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32-true",
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=null",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    if "ratio" in raw["model"]["init_args"] or "num_drop" in raw["model"]["init_args"]:
        args += ["--model.init_args.ratio=null", "--model.init_args.num_drop=2"]
    init_args = raw["model"]["init_args"]
    if raw["data"].get("prompt_field"):
        args += ["--data.prompt_field=null", "--data.input_field=null", "--data.response_field=null"]
    if raw["data"].get("dataset_config"):
        args.append("--data.dataset_config=null")
    if init_args.get("mask"):
        args.append(f"--model.init_args.mask={request.getfixturevalue('tiny_mask')}")
    if init_args.get("teacher"):
        args.append(f"--model.init_args.teacher={tiny_checkpoint}")
    if init_args.get("teacher_cache"):
        args.append(f"--model.init_args.teacher_cache={request.getfixturevalue('tiny_teacher_cache')}")
    if raw["model"]["init_args"].get("importance_batches"):
        args.append("--model.init_args.importance_batches=1")
    cli = main(args)
    assert cli.model.config.model_type == (model_type or "llama")
    if stage == "lit_prune.Perplexity":
        assert cli.trainer.callback_metrics["val/ppl"] > 1
        return
    masks = list(tmp_path.rglob("mask.json"))
    assert len(masks) == 1, "ModelExport wrote the run's mask.json"
    mask = json.loads(masks[0].read_text())
    assert mask["num_layers"] == 6 and len(mask["drop"]) == 2
    assert 0 not in mask["drop"] and 5 not in mask["drop"], "first and last layers are protected in every config"
    for callback in raw["trainer"].get("callbacks", []):
        if callback["class_path"].endswith("TemperatureSchedule"):
            assert cli.model.temperature == pytest.approx(callback["init_args"]["end"]), "the schedule reached its end"
    if stage in ("lit_prune.EndpointLoRA", "lit_prune.Distill"):
        from transformers import AutoModelForCausalLM

        assert masks[0].parent.name == "pruned", "recovery stages export the merged model with its mask"
        assert AutoModelForCausalLM.from_pretrained(masks[0].parent).config.num_hidden_layers == 4
    if init_args.get("teacher_cache"):
        assert cli.model.teacher_model is None, "a cached teacher loads no teacher model"
