"""Offline teacher top-K logits on disk (E3-Pruner's recovery: "Top-10 in all configs").

One pass of the teacher over the training blocks writes, for every block of ``seq_len`` tokens::

    <out_dir>/
      meta.json          model id, vocab size, k, seq_len, num_blocks, num_tokens, dtypes, bytes_per_token,
                         data_hash (one hash over every block's hash, in order), free-form data description
      block_hashes.npy   uint64 [num_blocks]: 64-bit blake2b of each block's input_ids (the lookup key)
      indices.bin        int32   [num_blocks, seq_len, k]  teacher top-k token ids (raw memmap, C order)
      values.bin         float16 [num_blocks, seq_len, k]  their logits at temperature 1

Storage is ``k * (4 + 2)`` bytes per token (60 for k = 10, about 30 GB for 0.5B tokens) plus 8 bytes per block.
Blocks are looked up by the hash of their token ids, so training may shuffle, resume or use a subset of the cached
blocks; a batch whose blocks are not in the cache (other data, tokenizer, block length, ...) raises
:class:`TeacherCacheError` naming the cache folder and what differs. The arrays are memory-mapped: a cache larger than
RAM costs only the pages of the blocks a batch touches.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lit_prune.components.kd import topk_teacher
from lit_prune.io import save_atomically

FORMAT = "lit_prune.topk_teacher_cache"
VERSION = 1
META = "meta.json"
HASHES = "block_hashes.npy"
INDICES = "indices.bin"
VALUES = "values.bin"
INDEX_DTYPE = np.int32
VALUE_DTYPE = np.float16


class TeacherCacheError(ValueError):
    """A teacher cache is missing, malformed, or does not match the data or model it is used with."""


def block_hash(tokens: np.ndarray | Tensor) -> int:
    """64-bit fingerprint of one block's token ids (independent of the integer dtype they arrive in)."""
    if isinstance(tokens, Tensor):
        tokens = tokens.detach().cpu().numpy()
    data = np.ascontiguousarray(tokens, dtype="<i8").tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def data_hash(hashes: Iterable[int]) -> str:
    """One hex digest over the block hashes in order: two caches of the same data have the same value."""
    digest = hashlib.blake2b(digest_size=16)
    for h in hashes:
        digest.update(int(h).to_bytes(8, "little"))
    return digest.hexdigest()


def _input_ids(batch: Any) -> Tensor:
    if isinstance(batch, dict):
        return batch["input_ids"]
    if isinstance(batch, Tensor):
        return batch
    raise TypeError(f"Batches must be dicts with `input_ids` or [batch, seq] tensors, got {type(batch).__name__}.")


@torch.no_grad()
def write_topk_cache(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor] | Tensor],
    out_dir: str | Path,
    k: int = 10,
    model_id: str | None = None,
    overwrite: bool = False,
    data_info: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
    log_every: int = 0,
) -> Path:
    """Run ``model`` over ``batches`` and store its top-``k`` logits per token.

    Args:
        model: The teacher (a causal LM returning ``.logits``); put in eval mode here.
        batches: Dicts with ``input_ids`` (or plain tensors) of shape ``[batch, seq]``, every block of one length.
        out_dir: Destination folder; must be empty or new unless ``overwrite``. Written atomically.
        k: Logits kept per token.
        model_id: Id recorded in meta.json (default: the model config's ``_name_or_path``).
        overwrite: Replace a non-empty ``out_dir``.
        data_info: Free-form description of the data (files, max_length, ...) recorded in meta.json.
        device: Where the teacher runs (default: where its weights are).
        log_every: Print progress every this many batches (0 = quiet).

    Returns:
        The cache folder.
    """
    config = getattr(model, "config", None)
    vocab_size = int(getattr(config, "vocab_size", 0) or 0)
    if vocab_size and not 1 <= k <= vocab_size:
        raise ValueError(f"`k` must be in [1, {vocab_size}] (the model's vocabulary), got {k}.")
    if vocab_size > np.iinfo(INDEX_DTYPE).max:
        raise ValueError(f"vocab_size={vocab_size} does not fit the cache's int32 token ids.")
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model_id = model_id or str(getattr(config, "_name_or_path", "") or "unknown")

    def write(folder: Path) -> None:
        hashes: list[int] = []
        seq_len: int | None = None
        logits_vocab = vocab_size
        with open(folder / INDICES, "wb") as f_idx, open(folder / VALUES, "wb") as f_val:
            for step, batch in enumerate(batches):
                input_ids = _input_ids(batch)
                if input_ids.dim() != 2:
                    raise ValueError(f"`input_ids` must be [batch, seq], got shape {tuple(input_ids.shape)}.")
                if seq_len is None:
                    seq_len = int(input_ids.size(1))
                elif input_ids.size(1) != seq_len:
                    raise ValueError(
                        f"All blocks of a cache must have one length: batch {step} has {input_ids.size(1)} tokens "
                        f"per block, earlier batches {seq_len}."
                    )
                logits = model(input_ids=input_ids.to(device), use_cache=False).logits
                logits_vocab = int(logits.size(-1))
                indices, values = topk_teacher(logits, k)
                f_idx.write(indices.cpu().numpy().astype(INDEX_DTYPE, copy=False).tobytes())
                f_val.write(values.cpu().numpy().astype(VALUE_DTYPE, copy=False).tobytes())
                hashes.extend(block_hash(row) for row in input_ids.cpu())
                if log_every and (step + 1) % log_every == 0:
                    print(f"cached {len(hashes)} blocks")
        if not hashes:
            raise ValueError("No batches to cache: the data gave no training blocks.")
        np.save(folder / HASHES, np.asarray(hashes, dtype=np.uint64))
        num_tokens = len(hashes) * seq_len
        data_bytes = sum((folder / name).stat().st_size for name in (INDICES, VALUES, HASHES))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "model": model_id,
            "vocab_size": logits_vocab,
            "k": k,
            "seq_len": seq_len,
            "num_blocks": len(hashes),
            "num_tokens": num_tokens,
            "index_dtype": np.dtype(INDEX_DTYPE).name,
            "value_dtype": np.dtype(VALUE_DTYPE).name,
            "logits_temperature": 1.0,
            "bytes_per_token": round(data_bytes / num_tokens, 4),
            "data_hash": data_hash(hashes),
            "data": data_info or {},
        }
        (folder / META).write_text(json.dumps(meta, indent=2) + "\n")

    return save_atomically(out_dir, write, overwrite)


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read and check ``meta.json`` of a cache folder (no arrays are opened)."""
    folder = Path(path)
    meta_file = folder / META
    if not meta_file.is_file():
        raise TeacherCacheError(
            f"{str(folder)!r} is not a teacher cache: {META} is missing. Build one with "
            "`python -m lit_prune cache-teacher --model M --text-files ... --out DIR`."
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise TeacherCacheError(f"{str(meta_file)!r} is not valid JSON: {err}. Rebuild the cache.") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise TeacherCacheError(
            f"{str(folder)!r} has format {meta.get('format')!r} version {meta.get('version')!r}; this lit_prune "
            f"reads {FORMAT!r} version {VERSION}. Rebuild the cache with this version."
        )
    return meta


class TopKCache:
    """Read a top-K teacher cache written by :func:`write_topk_cache`.

    Args:
        path: The cache folder.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.k = int(self.meta["k"])
        self.seq_len = int(self.meta["seq_len"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.num_blocks = int(self.meta["num_blocks"])
        hashes = np.load(self.path / HASHES)
        shape = (self.num_blocks, self.seq_len, self.k)
        expected = {INDICES: np.dtype(INDEX_DTYPE), VALUES: np.dtype(VALUE_DTYPE)}
        for name, dtype in expected.items():
            size = (self.path / name).stat().st_size if (self.path / name).is_file() else -1
            if size != int(np.prod(shape)) * dtype.itemsize:
                raise TeacherCacheError(
                    f"{str(self.path / name)!r} has {size} bytes, expected {int(np.prod(shape)) * dtype.itemsize} "
                    f"for {shape} {dtype.name} (meta.json). The cache is incomplete or corrupt: rebuild it."
                )
        if len(hashes) != self.num_blocks:
            raise TeacherCacheError(
                f"{str(self.path / HASHES)!r} holds {len(hashes)} block hashes, meta.json says {self.num_blocks} "
                "blocks. Rebuild the cache."
            )
        self.shape = shape
        self._arrays: tuple[np.memmap, np.memmap] | None = None
        # Identical blocks have identical teacher outputs, so the first row of a repeated hash serves them all.
        self.rows: dict[int, int] = {}
        for row, h in enumerate(hashes.tolist()):
            self.rows.setdefault(int(h), row)

    @property
    def arrays(self) -> tuple[np.memmap, np.memmap]:
        """``(indices, values)`` memory maps of shape ``[num_blocks, seq_len, k]``, opened on first use."""
        if self._arrays is None:
            self._arrays = (
                np.memmap(self.path / INDICES, dtype=INDEX_DTYPE, mode="r", shape=self.shape),
                np.memmap(self.path / VALUES, dtype=VALUE_DTYPE, mode="r", shape=self.shape),
            )
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        # Pickling (spawned workers, deepcopy) must not copy the arrays: each process maps the files itself.
        return {**self.__dict__, "_arrays": None}

    @property
    def model(self) -> str:
        return str(self.meta["model"])

    @property
    def bytes_per_token(self) -> float:
        return float(self.meta["bytes_per_token"])

    def __len__(self) -> int:
        return self.num_blocks

    def __repr__(self) -> str:
        return (
            f"TopKCache({str(self.path)!r}: {self.meta['model']}, k={self.k}, {self.num_blocks} blocks x "
            f"{self.seq_len} tokens, {self.bytes_per_token:g} bytes/token)"
        )

    def lookup(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher top-K for a batch of blocks.

        Args:
            input_ids: ``[batch, seq]`` token ids of blocks the cache was built from.

        Returns:
            ``(indices, values)``: ``[batch, seq, k]`` int64 token ids and float16 logits on ``input_ids.device``.
        """
        if input_ids.dim() != 2 or input_ids.size(1) != self.seq_len:
            raise TeacherCacheError(
                f"Teacher cache {str(self.path)!r} holds blocks of {self.seq_len} tokens, the batch has shape "
                f"{tuple(input_ids.shape)}. Use `data.max_length: {self.seq_len}`, or rebuild the cache with the "
                "training data settings."
            )
        rows = []
        for b, tokens in enumerate(input_ids.detach().cpu()):
            h = block_hash(tokens)
            row = self.rows.get(h)
            if row is None:
                head = tokens[:8].tolist()
                raise TeacherCacheError(
                    f"Teacher cache {str(self.path)!r} has no block with the token ids of batch row {b} (hash "
                    f"{h:016x}, starting {head}). It was built from {self.num_blocks} blocks of "
                    f"{self.seq_len} tokens with data {self.meta.get('data') or 'unknown'} (data_hash "
                    f"{self.meta.get('data_hash')}). The training data differ (files, tokenizer, max_length, "
                    "val_fraction, max_train_blocks): use the same data settings, or rebuild the cache from them."
                )
            rows.append(row)
        order = np.asarray(rows)
        all_indices, all_values = self.arrays
        indices = torch.from_numpy(np.ascontiguousarray(all_indices[order])).long()
        values = torch.from_numpy(np.ascontiguousarray(all_values[order]))
        return indices.to(input_ids.device), values.to(input_ids.device)

    def check_compatible(
        self,
        vocab_size: int | None = None,
        k: int | None = None,
        seq_len: int | None = None,
        model: str | None = None,
        key: str = "model.init_args.teacher_cache",
        allow_model_mismatch: bool = False,
    ) -> None:
        """Raise :class:`TeacherCacheError` if the cache does not fit a student, a K or a block length.

        Args:
            vocab_size: The student's vocabulary size.
            k: The K the caller expects (None accepts the cache's).
            seq_len: The block length of the training data.
            model: Id of the model the cache should come from (compared loosely: last path component).
            key: Config key named in errors.
            allow_model_mismatch: Accept a cache whose model id differs from ``model``.
        """
        from lit_prune.components.mask_io import same_model

        where = f"`{key}`={str(self.path)!r}"
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise TeacherCacheError(
                f"{where} stores logits over a vocabulary of {self.vocab_size} ids, the student has {vocab_size}. "
                "Teacher and student must share a tokenizer: rebuild the cache with a matching teacher."
            )
        if k is not None and k != self.k:
            raise TeacherCacheError(
                f"{where} stores the top-{self.k} logits per token, `model.init_args.teacher_k`={k}. Set "
                f"teacher_k to {self.k} or null, or rebuild the cache with --k {k}."
            )
        if seq_len is not None and seq_len != self.seq_len:
            raise TeacherCacheError(
                f"{where} holds blocks of {self.seq_len} tokens, but `data.max_length`={seq_len}. Use "
                f"data.max_length: {self.seq_len}, or rebuild the cache with --max-length {seq_len}."
            )
        if model is not None and not allow_model_mismatch and not same_model(model, self.model):
            raise TeacherCacheError(
                f"{where} was built from teacher {self.model!r}, but the student comes from {model!r}. Use the cache "
                "of the student's dense model, or set `model.init_args.allow_model_mismatch: true` if the teacher "
                "is meant to differ (same tokenizer)."
            )
