"""``python -m lit_prune cache-teacher``: write a teacher's top-K logits over the training blocks, once.

The blocks come from the same :class:`~lit_prune.data.PruneDataModule` the ``fit`` run uses, so pass the same data
settings (or ``--data-config`` with the run's YAML, whose ``data:`` section is read); the training blocks are visited
in order, unshuffled. A ``Distill`` run with ``teacher_cache`` then looks every batch up by its token ids.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
# DataModule settings the command forwards; other keys of a --data-config `data:` section are passed as they are.
DATA_FLAGS = ("text_files", "max_length", "batch_size", "val_fraction", "seed", "max_train_blocks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lit_prune cache-teacher",
        description="Cache a teacher's top-K logits for every training block (E3 recovery with an offline teacher).",
    )
    parser.add_argument("--model", required=True, help="Teacher: hub id, local folder, or offline:smollm2-135m.")
    parser.add_argument("--out", required=True, help="Output folder (must be empty or new).")
    parser.add_argument("--k", type=int, default=10,
                        help="Ids per token: top-K (10: 42 bytes/token with uint16 ids), or draws with --kind sampled.")
    parser.add_argument("--kind", default="topk", choices=["topk", "sampled"],
                        help="topk: top-K log-probs + tail mass; sampled: ids drawn from the teacher, with counts.")
    parser.add_argument(
        "--data-config",
        help="A LightningCLI YAML (e.g. the Distill config) whose `data:` section sets the data; flags below win.",
    )
    parser.add_argument("--text-files", nargs="+", help="Local files/globs or offline:britannica (as data.text_files).")
    parser.add_argument("--max-length", type=int, help="Tokens per block (data.max_length; default 512).")
    parser.add_argument("--batch-size", type=int, help="Blocks per teacher forward pass (default 4).")
    parser.add_argument("--val-fraction", type=float, help="Held-out tail, not cached (data.val_fraction; 0.1).")
    parser.add_argument("--seed", type=int, help="data.seed (does not change which blocks are cached).")
    parser.add_argument("--max-train-blocks", type=int, help="Cache only the first N training blocks.")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="Dtype the teacher is loaded in.")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty output folder.")
    return parser


def data_settings(args: argparse.Namespace) -> dict[str, Any]:
    """DataModule kwargs: the YAML's ``data:`` section (if any), overridden by explicit flags."""
    settings: dict[str, Any] = {}
    if args.data_config:
        import yaml

        path = Path(args.data_config)
        if not path.is_file():
            raise ValueError(f"`--data-config`={str(path)!r} does not exist. Pass a YAML with a `data:` section.")
        raw = yaml.safe_load(path.read_text()) or {}
        data = raw.get("data", raw)
        if not isinstance(data, dict):
            raise ValueError(f"`--data-config`={str(path)!r}: `data` must be a mapping of PruneDataModule settings.")
        settings.update({k: v for k, v in data.items() if k != "tokenizer"})
    for name in DATA_FLAGS:
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    if not settings.get("text_files") and not settings.get("dataset"):
        raise ValueError("Say which data to cache: `--text-files FILE...` or `--data-config RUN.yaml`.")
    return settings


def cache_teacher_main(argv: list[str]) -> None:
    """Entry point of ``python -m lit_prune cache-teacher``."""
    args = build_parser().parse_args(argv)
    if args.k < 1 or (args.kind == "sampled" and args.k > 255):
        raise ValueError(f"`--k` must be >= 1 (and <= 255 draws with --kind sampled), got {args.k}.")
    import torch
    from torch.utils.data import DataLoader

    from lit_prune.assets import canonical_model_id
    from lit_prune.components.teacher_cache import write_topk_cache
    from lit_prune.data import PruneDataModule, collate_blocks
    from lit_prune.hf import load_causal_lm, load_config
    from lit_prune.io import prepare_output_dir

    prepare_output_dir(args.out, args.overwrite, key="--out")  # before any data or weights load
    config = load_config(args.model, key="--model")
    if args.k > config.vocab_size:
        raise ValueError(f"`--k`={args.k} exceeds the vocabulary of {args.model!r} ({config.vocab_size}).")
    settings = data_settings(args)
    datamodule = PruneDataModule(tokenizer=args.model, **settings)
    datamodule.setup("fit")
    # In order, unshuffled: the cache is keyed by token ids, the order only makes it reproducible.
    loader = DataLoader(datamodule.train_set, batch_size=datamodule.hparams.batch_size, shuffle=False,
                        collate_fn=collate_blocks)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = load_causal_lm(args.model, args.dtype).to(device)
    info = {key: datamodule.hparams[key] for key in ("text_files", "dataset", "dataset_config", "split",
                                                      "max_length", "val_fraction", "max_train_blocks")}
    info["tokenizer"] = args.model
    out = write_topk_cache(model, loader, args.out, k=args.k, model_id=canonical_model_id(args.model),
                           overwrite=args.overwrite, data_info=info, device=device, log_every=50, kind=args.kind)
    from lit_prune.components.teacher_cache import TopKCache

    print(f"{TopKCache(out)}\nwrote {out}")
