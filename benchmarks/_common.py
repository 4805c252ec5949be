"""What the benchmark scripts share: machine line, model shapes, text blocks, perplexity, training set-up, timing.

The data, the perplexity and the training order come from lit_prune itself (``PruneDataModule``'s packing,
``evaluate_models.perplexity``, ``EpochShuffleSampler``), so a benchmark measures the code users run. Run the scripts
as modules from the repository root: ``python -m benchmarks.speed --help``.
"""

from __future__ import annotations

import gc
import json
import platform
import time
from pathlib import Path

import torch

# Real model shapes (random weights: timing and memory do not depend on weight values).
SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
    # For checking a script on a CPU: the same code path in seconds.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512),
}


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} x{torch.get_num_threads()} threads (torch {torch.__version__})"


def free_memory() -> None:
    """Drop unreferenced tensors and return cached GPU blocks, so the next measurement starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def text_blocks(
    tokenizer, text_files: list[str], seq: int, val_fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``PruneDataModule``'s blocks of ``seq`` tokens (one document per file, EOS after each), split off a tail.

    Its ``bos_per_block: auto`` rule applies: where the tokenizer adds a BOS (Gemma) every block starts with one, as
    context; SmolLM2's blocks are a plain cut of the token stream, as in every recorded run.

    Returns (the blocks before the tail, the tail of ``max(1, round(n * val_fraction))`` blocks).
    """
    from lit_prune.data import PruneDataModule

    data = PruneDataModule(tokenizer=tokenizer.name_or_path, text_files=list(text_files), max_length=seq)
    blocks = torch.stack([torch.as_tensor(b) for b in data.build_blocks()["input_ids"]])
    num_val = max(1, round(len(blocks) * val_fraction))
    return blocks[:-num_val], blocks[-num_val:]


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch: int, device: str) -> float:
    """Held-out token perplexity of ``model`` over ``blocks`` (``lit_prune evaluate``'s own computation)."""
    from lit_prune.evaluate_models import perplexity as evaluate_perplexity

    if getattr(model, "hf_quantizer", None) is None:
        model.to(device)  # Lightning moves a module back to the CPU when fit ends; quantized ones load placed
    model.eval()
    return evaluate_perplexity(model, blocks, blocks, batch)["ppl"]


def shuffled_loader(blocks: torch.Tensor, batch: int, seed: int = 1337):
    """Training batches in the DataModule's seeded, resumable order (the same for every variant of a benchmark)."""
    from torch.utils.data import DataLoader

    from lit_prune.data import EpochShuffleSampler, collate_blocks

    rows = [{"input_ids": b, "labels": b} for b in blocks]
    return DataLoader(rows, batch_size=batch, sampler=EpochShuffleSampler(len(rows), seed), collate_fn=collate_blocks)


def fit_seconds(stage, train: torch.Tensor, batch: int, steps: int, seed: int = 1337, callbacks=None) -> float:
    """Train a lit_prune stage for ``steps`` on shuffled ``train`` blocks (one device, clip 1.0, no logger).

    ``seed`` sets the batch order (the LoRA init follows the global seed: ``L.seed_everything`` before the stage).
    """
    import lightning as L

    trainer = L.Trainer(accelerator="auto", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=1.0, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(stage, train_dataloaders=shuffled_loader(train, batch, seed))
    return time.perf_counter() - start


def timed(fn, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of fn() (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def static_cache_decode_tokens_per_s(model, batch: int, prompt: int, new: int, device: str, compiled: bool = False,
                                     repeats: int = 5) -> float:
    """Greedy decode tokens/s with a static KV cache; only the decode loop is timed (the prefill is not)."""
    from transformers import StaticCache

    input_ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False) if compiled else model.forward
    # One cache for every repeat: a new cache object per run makes torch.compile recompile each time.
    cache = StaticCache(config=model.config, max_cache_len=prompt + new)
    positions = [torch.tensor([prompt + t], device=device) for t in range(new)]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    times = []
    for _ in range((2 if compiled else 1) + repeats):
        cache.reset()
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True,
                    cache_position=torch.arange(prompt, device=device))
        token = out.logits[:, -1:].argmax(-1)
        sync()
        start = time.perf_counter()
        for position in positions:
            out = step(input_ids=token, past_key_values=cache, use_cache=True, cache_position=position)
            token = out.logits[:, -1:].argmax(-1)
        sync()
        times.append(time.perf_counter() - start)
    timed_runs = sorted(times[-repeats:])
    return batch * new / timed_runs[len(timed_runs) // 2]


@torch.no_grad()
def generate_tokens_per_s(model, new_tokens: int, prompt_tokens: int = 32, repeats: int = 3) -> float:
    """Greedy ``generate`` tokens/s at batch 1 (median of ``repeats``), for models a static cache cannot serve
    (weight-quantized ones); the prompt is timed too, as a user of ``generate`` sees it."""
    high = min(20000, model.config.vocab_size)  # ids 100..20000 (the recorded runs'), inside small vocabularies too
    prompt = torch.randint(min(100, high - 1), high, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(prompt, **kwargs)
        times.append(time.perf_counter() - start)
    return new_tokens / sorted(times)[len(times) // 2]


def frozen_model(folder: str, dtype: str, device: str):
    """A causal LM in eval mode with every parameter frozen (what the mask scorers expect)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def held_out_kl_scorer(model, gating, batches: list[torch.Tensor], device: str):
    """``drop -> KL(dense || model without drop)`` on ``batches``; the dense logits are computed once."""
    from lit_prune.components.scorers import output_kl, teacher_logits_for

    teacher = teacher_logits_for(model, gating, batches)
    if device == "cuda":  # kept on the GPU: Gemma's 262k-vocab logits (17 GB for 64 x 256 tokens) cost seconds per trip
        teacher = [t.to(device) for t in teacher]

    def held_out_kl(drop) -> float:
        keep = torch.tensor([i not in set(drop) for i in range(gating.num_layers)], dtype=torch.float32)
        return output_kl(model, gating, batches, keep, teacher_logits=teacher)

    return held_out_kl


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1))


def add_recovery_arguments(parser) -> None:
    """The options every recovery benchmark shares: model, texts, mask, block size, batch, steps, held-out size, lr."""
    parser.add_argument("--model", default="offline:smollm2-135m")
    parser.add_argument("--text", nargs="+", default=["offline:britannica"])
    parser.add_argument("--train-text", nargs="*", default=[])
    parser.add_argument("--mask", required=True)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--val-blocks", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)


def recovery_blocks(args) -> dict:
    """The model folder, the mask and the training / held-out blocks of a recovery benchmark (no weights load).

    Training blocks: ``--text`` without its held-out tail, plus all of ``--train-text``, capped at
    ``--max-train-blocks`` when the script has that option. Held-out: the first ``--val-blocks`` of ``--text``'s tail
    (training never sees it).
    """
    from transformers import AutoTokenizer

    from lit_prune.assets import resolve_pretrained, resolve_text_source
    from lit_prune.components.mask_io import load_mask

    folder = resolve_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train, val = text_blocks(tokenizer, [f for n in args.text for f in resolve_text_source(n)], args.seq)
    if args.train_text:
        extra, _ = text_blocks(tokenizer, [f for n in args.train_text for f in resolve_text_source(n)], args.seq,
                               val_fraction=0.0001)
        train = torch.cat([train, extra])
    if getattr(args, "max_train_blocks", None):
        train = train[: args.max_train_blocks]
    val = val[: args.val_blocks]
    return {"folder": folder, "mask": load_mask(args.mask), "train": train, "val": val}


def recovery_baseline(args, device: str) -> dict:
    """:func:`recovery_blocks` plus the dense / plainly pruned held-out perplexities every recovery row is compared
    with (``dense_ppl``, ``pruned_ppl``)."""
    from transformers import AutoModelForCausalLM

    from lit_prune.components.surgery import drop_layers

    data = recovery_blocks(args)
    folder, mask, train, val = data["folder"], data["mask"], data["train"], data["val"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device)
    dense_ppl = perplexity(model, val, args.batch, device)
    drop_layers(model, mask.drop)
    pruned_ppl = perplexity(model, val, args.batch, device)
    del model
    return {"folder": folder, "mask": mask, "train": train, "val": val, "dense_ppl": dense_ppl,
            "pruned_ppl": pruned_ppl}


# ------------------------------------------------------------------------------------------------ KD variants
KD_VARIANT_FORMS = "online, tail_K, renormalized_K or sampled_N (e.g. tail_15)"


def parse_kd_variant(name: str) -> tuple[str, int | None]:
    """A KD teacher variant: ``online`` -> (online, None); ``tail_15`` -> (tail, 15); ``sampled_12`` -> (sampled,
    12); ``renormalized_10`` -> (renormalized, 10). Raises ValueError naming the allowed forms."""
    if name == "online":
        return name, None
    kind, _, size = name.rpartition("_")
    if kind not in ("tail", "renormalized", "sampled") or not size.isdigit() or int(size) < 1:
        raise ValueError(f"{name!r} is not {KD_VARIANT_FORMS}.")
    return kind, int(size)


def cache_name(variant: str, size: int | None) -> str | None:
    """Folder name of the teacher cache a variant reads (``tail`` and ``renormalized`` share a top-K cache)."""
    if variant == "online":
        return None
    return f"{'sampled' if variant == 'sampled' else 'topk'}_{size}"


def build_teacher_cache(folder: str, train: torch.Tensor, batch: int, out_dir: Path, name: str, model_id: str,
                        device: str) -> dict:
    """Write the teacher cache ``name`` (``topk_K`` / ``sampled_N``) of ``train`` into ``out_dir / name`` once.

    Returns its ``bytes_per_token`` and build ``seconds`` (None when it was already there)."""
    from transformers import AutoModelForCausalLM

    from lit_prune.components.teacher_cache import write_topk_cache

    target = Path(out_dir) / name
    seconds = None
    if not (target / "meta.json").exists():
        kind, _, size = name.rpartition("_")
        start = time.perf_counter()
        teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
        write_topk_cache(teacher, [{"input_ids": b} for b in train.split(batch)], target, k=int(size),
                         model_id=model_id, device=device, kind=kind, overwrite=True)
        del teacher
        seconds = time.perf_counter() - start
    meta = json.loads((target / "meta.json").read_text())
    return {"bytes_per_token": meta["bytes_per_token"], "seconds": seconds}


def kd_stage(folder: str, mask: str, lr: float, variant: str, size: int | None, cache_dir: Path | None,
             weighting: str = "none", select_fraction: float = 0.2, student: str | None = None):
    """The recovery benchmarks' KD stage: forward KL at temperature 1, no CE, LoRA on every kept layer, bf16, AdamW
    at ``lr``; the teacher online or the cache of ``variant`` under ``cache_dir`` (:func:`cache_name`).

    ``student``: an already pruned folder to heal instead of cutting ``folder`` with ``mask`` (the teacher stays
    ``folder``)."""
    from lit_prune import Distill
    from lit_prune.components.lora import LLAMA_PROJECTIONS

    if variant == "online":
        teacher = dict(teacher=folder)
    else:
        teacher = dict(teacher_cache=str(Path(cache_dir) / cache_name(variant, size)), cache_variant=variant)
    optimizer = lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0)  # noqa: E731
    return Distill(pretrained=student or folder, mask=None if student else mask, dtype="bfloat16", optimizer=optimizer,
                   allow_model_mismatch=True,
                   target_modules=LLAMA_PROJECTIONS, weighting=weighting, select_fraction=select_fraction,
                   train="lora", lora_layers="all", **teacher)


def recovery_results(args, base: dict, **extra) -> dict:
    """The head of a recovery benchmark's results: machine, arguments, block counts, tokens per variant, baselines."""
    return {"machine": machine(), "args": vars(args), "train_blocks": len(base["train"]),
            "val_blocks": len(base["val"]), "tokens_per_variant": args.steps * args.batch * args.seq,
            "dense_ppl": base["dense_ppl"], "pruned_ppl": base["pruned_ppl"], **extra, "variants": {}}


def char_tokenizer():
    """A character-level fast tokenizer (printable ASCII), saved beside the random weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): i + 3 for i, c in enumerate(range(32, 127))}}
    vocab["\n"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def write_text(path: Path, characters: int) -> None:
    """Seeded pseudo-words: one token per character with the character tokenizer."""
    generator = torch.Generator().manual_seed(0)
    letters = "etaoinshrdlucmfwypvbgkqjxz"
    words, size = [], 0
    while size < characters:
        length = int(torch.randint(2, 9, (1,), generator=generator))
        word = "".join(letters[int(i)] for i in torch.randint(0, len(letters), (length,), generator=generator))
        words.append(word)
        size += length + 1
    lines = [" ".join(words[i : i + 16]) for i in range(0, len(words), 16)]
    path.write_text("\n".join(lines) + "\n")
