"""The distributed code path on the CPU: two DDP processes (gloo) through the real CLI, and early strategy errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from lit_prune.components.mask_io import load_mask
from lit_prune.stages.distributed import check_run_settings

ROOT = Path(__file__).resolve().parents[1]


def write_search_config(path: Path, checkpoint: Path, text: Path, out: Path) -> None:
    config = {
        "seed_everything": 7,
        "model": {
            "class_path": "lit_prune.MaskSearch",
            "init_args": {
                "pretrained": str(checkpoint), "num_drop": 2, "ratio": None, "importance_init": "kl",
                "importance_batches": 1,
                "gate": {"class_path": "lit_prune.GumbelTopKGate", "init_args": {"protect_first": 1,
                                                                                  "protect_last": 1}},
                "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.05}},
            },
        },
        "data": {"text_files": [str(text)], "max_length": 32, "batch_size": 2, "val_fraction": 0.1,
                 "max_val_blocks": 4, "num_workers": 0},
        "trainer": {
            "accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_steps": 4, "logger": False,
            "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
            "limit_val_batches": 1, "default_root_dir": str(out),
            "callbacks": [
                {"class_path": "lit_prune.callbacks.ModelExport",
                 "init_args": {"what": "both", "dirpath": str(out / "export")}},
                {"class_path": "ddp_probe.RankProbe", "init_args": {"dirpath": str(out / "probe")}},
            ],
        },
    }
    path.write_text(yaml.safe_dump(config))


def test_two_process_ddp_search_agrees_across_ranks_and_exports_once(tiny_checkpoint, tiny_text, tmp_path):
    config = tmp_path / "search.yaml"
    write_search_config(config, tiny_checkpoint, tiny_text, tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
           "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    result = subprocess.run([sys.executable, "-m", "lit_prune", "fit", "-c", str(config)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["first_tokens"] != ranks[1]["first_tokens"], "each rank trains on its own share of the data"
    assert ranks[0]["gate"] == ranks[1]["gate"], "averaged gradients and a shared KL init keep one gate"
    assert ranks[0]["drop"] == ranks[1]["drop"]

    mask = load_mask(tmp_path / "export" / "mask.json")
    assert mask.drop == ranks[0]["drop"] and len(mask.drop) == 2
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "pruned")
    assert pruned.config.num_hidden_layers == 4
    dense = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    kept = [i for i in range(6) if i not in mask.drop]
    for new, old in enumerate(kept):  # rank 0 wrote the frozen weights of exactly the kept layers
        torch.testing.assert_close(pruned.model.layers[new].mlp.up_proj.weight,
                                   dense.model.layers[old].mlp.up_proj.weight)


def fake_trainer(strategy, precision: str = "bf16-mixed"):
    return SimpleNamespace(strategy=strategy, precision=precision)


def fsdp(**kwargs):
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy(**kwargs)


@pytest.fixture()
def search_stage(tiny_checkpoint):
    from lit_prune import ConcaveGate, MaskSearch

    return MaskSearch(str(tiny_checkpoint), gate=ConcaveGate, num_drop=2, ratio=None, dtype="bfloat16")


def test_fp16_precision_with_bf16_weights_is_refused(search_stage):
    with pytest.raises(ValueError, match=r"trainer.precision.*'16-mixed'.*bf16-mixed"):
        check_run_settings(search_stage, fake_trainer(strategy=None, precision="16-mixed"))


def test_fsdp_wrap_policy_must_name_the_decoder_layer(search_stage):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

    with pytest.raises(ValueError, match=r"auto_wrap_policy.*LlamaDecoderLayer.*modeling_llama.LlamaDecoderLayer"):
        check_run_settings(search_stage, fake_trainer(fsdp(auto_wrap_policy={Qwen3DecoderLayer})))


def test_fsdp_true_precision_would_cast_the_float32_gate(search_stage):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    strategy = fsdp(auto_wrap_policy={LlamaDecoderLayer})
    with pytest.raises(ValueError, match=r"float32 module.*'bf16-true'.*bf16-mixed"):
        check_run_settings(search_stage, fake_trainer(strategy, "bf16-true"), float32_trainables=True)
    check_run_settings(search_stage, fake_trainer(strategy, "bf16-mixed"), float32_trainables=True)


def test_fsdp_with_two_activation_checkpointing_settings_is_refused(tiny_checkpoint):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lit_prune import ConcaveGate, MaskSearch

    stage = MaskSearch(str(tiny_checkpoint), gate=ConcaveGate, num_drop=2, ratio=None, gradient_checkpointing=True)
    strategy = fsdp(auto_wrap_policy={LlamaDecoderLayer}, activation_checkpointing_policy={LlamaDecoderLayer})
    with pytest.raises(ValueError, match="checkpointing is set twice"):
        check_run_settings(stage, fake_trainer(strategy))


FSDP_CONFIGS = [p for p in sorted((ROOT / "configs").glob("*.yaml"))
                if "FSDPStrategy" in str(yaml.safe_load(p.read_text())["trainer"].get("strategy"))]


@pytest.mark.parametrize("config", FSDP_CONFIGS, ids=lambda p: p.stem)
def test_shipped_fsdp_configs_pass_the_strategy_checks(config, tmp_path):
    """The real FSDP settings of each shipped config, checked against a tiny model of the same architecture."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy
    from tiny import char_tokenizer, tiny_model

    raw = yaml.safe_load(config.read_text())
    from test_configs import TINY_MODEL_TYPES

    model_type = TINY_MODEL_TYPES.get(config.stem, "qwen3" if "qwen3" in config.stem else "llama")
    checkpoint = tmp_path / model_type
    char_tokenizer().save_pretrained(checkpoint)
    tiny_model(model_type).save_pretrained(checkpoint)

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": raw["trainer"]["strategy"]})).strategy
    init_args = dict(raw["model"]["init_args"])
    is_search = raw["model"]["class_path"] == "lit_prune.MaskSearch"
    adds_lora = init_args.get("train", "lora") == "lora" and not is_search
    stage = SimpleNamespace(dtype_name=init_args.get("dtype", "auto"), pretrained=str(checkpoint),
                            gradient_checkpointing=init_args.get("gradient_checkpointing", False),
                            config=AutoModelForCausalLM.from_pretrained(checkpoint).config)
    check_run_settings(stage, fake_trainer(strategy, raw["trainer"]["precision"]), float32_trainables=is_search,
                       float32_adapters=adds_lora)


def test_too_few_training_blocks_for_the_processes_is_refused(tiny_checkpoint, tiny_text):
    from lit_prune.data import DataConfigError, PruneDataModule

    data = PruneDataModule(tokenizer=str(tiny_checkpoint), text_files=[str(tiny_text)], max_length=64,
                           batch_size=2, val_fraction=0.1)
    data.trainer = SimpleNamespace(world_size=100)
    with pytest.raises(DataConfigError, match=r"training block\(s\) of 64 tokens for 100 process\(es\).*batch_size"):
        data.setup("fit")


def test_out_of_memory_in_fit_names_the_settings_to_change(tiny_checkpoint, tiny_text, tmp_path, monkeypatch):
    from lit_prune import MaskSearch
    from lit_prune.cli import main

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(MaskSearch, "training_step", out_of_memory)
    with pytest.raises(RuntimeError, match=r"ran out of memory with .*--data.batch_size=4.*kl_chunk_tokens.*scale.md"):
        main(["fit", "-c", str(ROOT / "configs" / "clp_smollm2.yaml"),
              f"--model.init_args.pretrained={tiny_checkpoint}", "--model.init_args.dtype=float32",
              f"--data.text_files=[{tiny_text}]", "--data.max_length=32",
              "--data.batch_size=4", "--trainer.accelerator=cpu", "--trainer.max_steps=1", "--trainer.logger=false",
              "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.num_sanity_val_steps=0", "--model.init_args.ratio=null", "--model.init_args.num_drop=2"])


def test_fsdp_with_float32_lora_on_bf16_weights_is_refused(search_stage):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    strategy = fsdp(auto_wrap_policy={LlamaDecoderLayer})
    with pytest.raises(ValueError, match=r"LoRA adapters are float32.*dtype: float32"):
        check_run_settings(search_stage, fake_trainer(strategy), float32_adapters=True)


def fsdp_rank(rank: int, world_size: int = 2):
    from lightning.fabric.plugins.environments import LightningEnvironment

    environment = LightningEnvironment()
    environment.set_world_size(world_size)
    environment.set_global_rank(rank)
    return fsdp(parallel_devices=[torch.device("cpu")] * world_size, cluster_environment=environment)


@pytest.mark.parametrize("rank", [0, 1])
def test_fsdp_ranks_above_zero_build_on_meta_and_rank0_loads(tiny_checkpoint, rank):
    from lit_prune import ConcaveGate, MaskSearch

    strategy = fsdp_rank(rank)
    stage = MaskSearch(str(tiny_checkpoint), gate=ConcaveGate, num_drop=2, ratio=None)
    stage._trainer = SimpleNamespace(strategy=strategy)
    stage.configure_model()

    devices = {p.device.type for p in stage.model.parameters()}
    assert devices == ({"meta"} if rank else {"cpu"}), "only rank 0 reads the checkpoint"
    assert stage.weights_on_meta == bool(rank)
    assert strategy.kwargs["sync_module_states"] is True, "FSDP broadcasts rank 0's weights while sharding"
    assert strategy.kwargs["ignored_states"] == [stage.gate], "the float32 gate stays out of the flat parameters"
    assert not any(p.is_meta for p in stage.gate.parameters())
    layer = stage.model.model.layers[0].mlp.up_proj
    strategy.kwargs["param_init_fn"](layer)  # what FSDP calls on each meta module before the broadcast
    assert not layer.weight.is_meta and layer.weight.device.type == "cpu"


def test_single_process_fsdp_changes_no_loading(tiny_checkpoint):
    from lit_prune import ConcaveGate, MaskSearch

    strategy = fsdp_rank(0, world_size=1)
    stage = MaskSearch(str(tiny_checkpoint), gate=ConcaveGate, num_drop=2, ratio=None)
    stage._trainer = SimpleNamespace(strategy=strategy)
    stage.configure_model()
    assert not stage.weights_on_meta and "sync_module_states" not in strategy.kwargs
    assert strategy.kwargs["ignored_states"] == [stage.gate]
