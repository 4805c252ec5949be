"""Offline teacher distributions on disk: top-K + tail (default), sampled ids, or E3's top-K logits (format v1).

One pass of the teacher over the training blocks writes, for every block of ``seq_len`` tokens::

    <out_dir>/
      meta.json          format, version, kind, model id, vocab size, k (slots per token), seq_len, num_blocks,
                         num_tokens, dtypes, bytes_per_token, data_hash (one hash over every block's hash, in order),
                         free-form data description (files, tokenizer, max_length, ...)
      block_hashes.npy   uint64 [num_blocks]: 64-bit blake2b of each block's input_ids (the lookup key)
      indices.bin        uint16 (vocab <= 65536) or int32 [num_blocks, seq_len, k]  token ids (raw memmap, C order)
      values.bin         float16 [num_blocks, seq_len, k]  the teacher's log-probabilities at those ids, normalised
                         over the full vocabulary (format v1: raw top-K logits)
      tail.bin           float16 [num_blocks, seq_len]     kind "topk": log of the mass outside the K ids
      counts.bin         uint8   [num_blocks, seq_len, k]  kind "sampled": draws per id (0 = empty slot)

Kinds (format version 2):

- ``topk`` (default): the K most likely ids plus the tail mass; read as ``variant="tail"`` (KL over K+1 buckets, exact
  when K covers the teacher's support) or ``variant="renormalized"`` (E3-Pruner's renormalised top-K, the paper's
  recipe, kept to reproduce it).
- ``sampled``: ``draws`` ids sampled from the teacher with replacement, stored as distinct ids with counts (random
  sampling KD, Anshumann et al. 2025): an unbiased estimate of the full KD loss (``variant="sampled"``).

Storage per token: ``topk`` ``k * (2 + 2) + 2`` bytes with uint16 ids (62 for k = 15; 6 per id with int32 ids),
``sampled`` ``k * (2 + 2 + 1)``, plus 8 bytes per block. Format v1 caches (top-K logits, written before the tail
existed) are still read, for the ``renormalized`` variant only; anything else asks for a rebuild.

Blocks are looked up by the hash of their token ids, so training may shuffle, resume or use a subset of the cached
blocks; :meth:`TopKCache.check_blocks` refuses data that is not in the cache before any weights load, and a batch
whose blocks are not in the cache raises :class:`TeacherCacheError` naming the cache folder and what differs. The
arrays are memory-mapped: a cache larger than RAM costs only the pages of the blocks a batch touches.
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

from lit_prune.components.kd import SparseTeacher, sample_teacher, topk_with_tail
from lit_prune.io import save_atomically

FORMAT = "lit_prune.topk_teacher_cache"
VERSION = 2
READABLE_VERSIONS = (1, 2)
META = "meta.json"
HASHES = "block_hashes.npy"
INDICES = "indices.bin"
VALUES = "values.bin"
TAIL = "tail.bin"
COUNTS = "counts.bin"
INDEX_DTYPE = np.int32  # vocabularies above 65536 ids
SMALL_INDEX_DTYPE = np.uint16
VALUE_DTYPE = np.float16
COUNT_DTYPE = np.uint8
KINDS = ("topk", "sampled")
# variant -> the cache kinds it can read ("topk_logits" = format v1).
VARIANTS = {"tail": ("topk",), "renormalized": ("topk", "topk_logits"), "sampled": ("sampled",)}
REBUILD = "python -m lit_prune cache-teacher --model M --text-files ... --out DIR"


def index_dtype(vocab_size: int) -> np.dtype:
    """uint16 ids where the vocabulary fits (2 bytes saved per id), int32 otherwise."""
    return np.dtype(SMALL_INDEX_DTYPE if 0 < vocab_size <= np.iinfo(SMALL_INDEX_DTYPE).max + 1 else INDEX_DTYPE)


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
    kind: str = "topk",
    seed: int = 0,
) -> Path:
    """Run ``model`` over ``batches`` and store a sparse form of its next-token distribution per token.

    Args:
        model: The teacher (a causal LM returning ``.logits``); put in eval mode here.
        batches: Dicts with ``input_ids`` (or plain tensors) of shape ``[batch, seq]``, every block of one length.
        out_dir: Destination folder; must be empty or new unless ``overwrite``. Written atomically.
        k: Ids kept per token: the top-K (``kind="topk"``), or the number of draws (``kind="sampled"``, <= 255).
        model_id: Id recorded in meta.json (default: the model config's ``_name_or_path``).
        overwrite: Replace a non-empty ``out_dir``.
        data_info: Free-form description of the data (files, max_length, ...) recorded in meta.json.
        device: Where the teacher runs (default: where its weights are).
        log_every: Print progress every this many batches (0 = quiet).
        kind: ``topk`` (top-K log-probabilities + tail mass) or ``sampled`` (ids drawn from the teacher, with counts).
        seed: Seed of the draws of ``kind="sampled"``.

    Returns:
        The cache folder.
    """
    config = getattr(model, "config", None)
    vocab_size = int(getattr(config, "vocab_size", 0) or 0)
    if vocab_size and kind == "topk" and not 1 <= k <= vocab_size:
        raise ValueError(f"`k` must be in [1, {vocab_size}] (the model's vocabulary), got {k}.")
    if vocab_size > np.iinfo(INDEX_DTYPE).max:
        raise ValueError(f"vocab_size={vocab_size} does not fit the cache's int32 token ids.")
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {', '.join(KINDS)}, got {kind!r}.")
    if kind == "sampled" and not 1 <= k <= 255:
        raise ValueError(f"`k` (draws per token) of a sampled cache must be in [1, 255], got {k}.")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model_id = model_id or str(getattr(config, "_name_or_path", "") or "unknown")

    def write(folder: Path) -> None:
        hashes: list[int] = []
        seq_len: int | None = None
        logits_vocab = vocab_size
        ids_dtype = index_dtype(vocab_size)
        extra_name, extra_dtype = (TAIL, VALUE_DTYPE) if kind == "topk" else (COUNTS, COUNT_DTYPE)
        with open(folder / INDICES, "wb") as f_idx, open(folder / VALUES, "wb") as f_val, \
                open(folder / extra_name, "wb") as f_extra:
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
                if kind == "topk":
                    indices, values, extra = topk_with_tail(logits, k)
                else:  # uniforms from the CPU generator keep a cache reproducible across devices
                    indices, values, extra = sample_teacher(logits, k, generator)
                f_idx.write(indices.cpu().numpy().astype(ids_dtype, copy=False).tobytes())
                f_val.write(values.cpu().numpy().astype(VALUE_DTYPE, copy=False).tobytes())
                f_extra.write(extra.cpu().numpy().astype(extra_dtype, copy=False).tobytes())
                hashes.extend(block_hash(row) for row in input_ids.cpu())
                if log_every and (step + 1) % log_every == 0:
                    print(f"cached {len(hashes)} blocks")
        if not hashes:
            raise ValueError("No batches to cache: the data gave no training blocks.")
        np.save(folder / HASHES, np.asarray(hashes, dtype=np.uint64))
        num_tokens = len(hashes) * seq_len
        data_bytes = sum((folder / name).stat().st_size for name in (INDICES, VALUES, extra_name, HASHES))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "kind": kind,
            "model": model_id,
            "vocab_size": logits_vocab,
            "k": k,
            "seq_len": seq_len,
            "num_blocks": len(hashes),
            "num_tokens": num_tokens,
            "index_dtype": ids_dtype.name,
            "value_dtype": np.dtype(VALUE_DTYPE).name,
            "values": "log-probabilities over the full vocabulary",
            "logits_temperature": 1.0,
            "bytes_per_token": round(data_bytes / num_tokens, 4),
            "data_hash": data_hash(hashes),
            "data": data_info or {},
        }
        if kind == "sampled":
            meta["seed"] = seed
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
    if meta.get("format") != FORMAT or meta.get("version") not in READABLE_VERSIONS:
        raise TeacherCacheError(
            f"{str(folder)!r} has format {meta.get('format')!r} version {meta.get('version')!r}; this lit_prune "
            f"reads {FORMAT!r} versions {READABLE_VERSIONS}. Rebuild the cache: {REBUILD}."
        )
    if meta["version"] == 1:
        meta["kind"] = "topk_logits"  # v1 stored raw top-K logits, no tail
    return meta


class TopKCache:
    """Read a teacher cache written by :func:`write_topk_cache`.

    Args:
        path: The cache folder.
        variant: How the KD loss reads it: ``tail`` (top-K + tail, the default for ``topk`` caches),
            ``renormalized`` (E3-Pruner's top-K renormalised over the K ids; the only one a format-v1 cache allows)
            or ``sampled`` (the default and only variant of ``sampled`` caches). None picks the cache's default.
        key: Config key named in errors.
    """

    def __init__(
        self, path: str | Path, variant: str | None = None, key: str = "model.init_args.cache_variant"
    ) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.kind = str(self.meta.get("kind", "topk"))
        if variant is None:
            variant = {"topk": "tail", "topk_logits": "renormalized", "sampled": "sampled"}.get(self.kind)
        if variant not in VARIANTS:
            raise TeacherCacheError(f"`{key}` must be one of {', '.join(VARIANTS)} or null, got {variant!r}.")
        if self.kind not in VARIANTS[variant]:
            kind_flag = " --kind sampled" if variant == "sampled" else ""
            hint = f"Rebuild it with this version for `{variant}`: {REBUILD}{kind_flag}"
            if self.kind == "sampled":
                hint = "Use `sampled` with this cache, or build a top-K cache for `tail` / `renormalized`."
            raise TeacherCacheError(
                f"{str(self.path)!r} is a {self.kind!r} cache (format version {self.meta['version']}), which cannot "
                f"give the `{key}: {variant}` loss. {hint}"
            )
        self.variant = variant
        self.k = int(self.meta["k"])
        self.seq_len = int(self.meta["seq_len"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.num_blocks = int(self.meta["num_blocks"])
        hashes = np.load(self.path / HASHES)
        shape = (self.num_blocks, self.seq_len, self.k)
        ids = np.dtype(self.meta.get("index_dtype", "int32"))
        self.files = {INDICES: (ids, shape), VALUES: (np.dtype(VALUE_DTYPE), shape)}
        if self.kind == "topk":
            self.files[TAIL] = (np.dtype(VALUE_DTYPE), shape[:2])
        elif self.kind == "sampled":
            self.files[COUNTS] = (np.dtype(COUNT_DTYPE), shape)
        for name, (dtype, file_shape) in self.files.items():
            size = (self.path / name).stat().st_size if (self.path / name).is_file() else -1
            if size != int(np.prod(file_shape)) * dtype.itemsize:
                raise TeacherCacheError(
                    f"{str(self.path / name)!r} has {size} bytes, expected "
                    f"{int(np.prod(file_shape)) * dtype.itemsize} for {file_shape} {dtype.name} (meta.json). The "
                    f"cache is incomplete or corrupt: rebuild it ({REBUILD})."
                )
        if len(hashes) != self.num_blocks:
            raise TeacherCacheError(
                f"{str(self.path / HASHES)!r} holds {len(hashes)} block hashes, meta.json says {self.num_blocks} "
                "blocks. Rebuild the cache."
            )
        self.shape = shape
        self._arrays: dict[str, np.memmap] | None = None
        # Identical blocks have identical teacher outputs, so the first row of a repeated hash serves them all.
        self.rows: dict[int, int] = {}
        for row, h in enumerate(hashes.tolist()):
            self.rows.setdefault(int(h), row)

    @property
    def arrays(self) -> dict[str, np.memmap]:
        """Memory maps of the cache files (``indices.bin``, ``values.bin``, ``tail.bin`` | ``counts.bin``)."""
        if self._arrays is None:
            self._arrays = {name: np.memmap(self.path / name, dtype=dtype, mode="r", shape=shape)
                            for name, (dtype, shape) in self.files.items()}
        return self._arrays

    def check_blocks(self, blocks: Iterable, key: str = "data") -> None:
        """Refuse training data with blocks the cache does not hold (before any weights load).

        Args:
            blocks: ``[seq]`` token-id rows, or dicts with ``input_ids`` (a DataModule's training set).
            key: Config section named in errors.
        """
        missing, total, first = 0, 0, None
        for block in blocks:
            tokens = block["input_ids"] if isinstance(block, dict) else block
            tokens = torch.as_tensor(tokens)
            total += 1
            if tokens.shape[-1] != self.seq_len:
                raise TeacherCacheError(
                    f"Teacher cache {str(self.path)!r} holds blocks of {self.seq_len} tokens, the `{key}` blocks have "
                    f"{tokens.shape[-1]}. Use `data.max_length: {self.seq_len}`, or rebuild the cache: {REBUILD}."
                )
            if block_hash(tokens) not in self.rows:
                missing += 1
                first = total - 1 if first is None else first
        if missing:
            raise TeacherCacheError(
                f"Teacher cache {str(self.path)!r} lacks {missing} of the {total} training blocks of `{key}` (first: "
                f"block {first}). It was built from data {self.meta.get('data') or 'unknown'}; the corpus, tokenizer, "
                f"max_length or split differ. Use the cache's data settings, or rebuild it from these: {REBUILD}."
            )

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
            f"TopKCache({str(self.path)!r}: {self.kind} read as {self.variant}, {self.meta['model']}, k={self.k}, "
            f"{self.num_blocks} blocks x {self.seq_len} tokens, {self.bytes_per_token:g} bytes/token)"
        )

    def lookup(self, input_ids: Tensor) -> tuple[Tensor, Tensor] | SparseTeacher:
        """The cached teacher for a batch of blocks, in the form the KD loss of ``self.variant`` reads.

        Args:
            input_ids: ``[batch, seq]`` token ids of blocks the cache was built from.

        Returns:
            ``renormalized``: ``(indices, values)``, ``[batch, seq, k]`` int64 token ids and float16 values (log-probs;
            logits for a v1 cache); ``tail`` / ``sampled``: a :class:`SparseTeacher`. On ``input_ids.device``.
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
        arrays = self.arrays
        take = lambda name: torch.from_numpy(np.ascontiguousarray(arrays[name][order]))  # noqa: E731
        indices, values = take(INDICES).long(), take(VALUES)
        if self.variant == "renormalized":  # E3's form: softmax over the K values (logits or log-probs alike)
            return indices.to(input_ids.device), values.to(input_ids.device)
        if self.variant == "tail":
            teacher = SparseTeacher(indices, values.float(), tail=take(TAIL).float())
        else:
            teacher = SparseTeacher(indices, values.float(), counts=take(COUNTS).long())
        return teacher.to(input_ids.device)

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
