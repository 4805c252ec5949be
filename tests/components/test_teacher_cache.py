"""Teacher top-K cache: round trip, storage cost, and clear errors for data or settings that do not match."""

import json
import pickle

import numpy as np
import pytest
import torch
from tiny import VOCAB, tiny_model

from lit_prune.components.kd import topk_teacher
from lit_prune.components.teacher_cache import TeacherCacheError, TopKCache, block_hash, write_topk_cache
from lit_prune.teacher_cache_cli import cache_teacher_main

SEQ, K = 16, 5


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("llama")


def _blocks(seed: int, num: int = 6) -> torch.Tensor:
    return torch.randint(3, VOCAB, (num, SEQ), generator=torch.Generator().manual_seed(seed))


def _batches(blocks: torch.Tensor, size: int = 2):
    return [{"input_ids": blocks[i : i + size], "labels": blocks[i : i + size]} for i in range(0, len(blocks), size)]


def test_round_trip_in_any_order(teacher, tmp_path):
    blocks = _blocks(0)
    out = write_topk_cache(teacher, _batches(blocks), tmp_path / "cache", k=K, model_id="tiny")
    cache = TopKCache(out)
    assert (len(cache), cache.k, cache.seq_len, cache.vocab_size, cache.model) == (6, K, SEQ, VOCAB, "tiny")
    batch = blocks[[4, 1, 1]]  # shuffled, repeated
    indices, values = cache.lookup(batch)
    with torch.no_grad():
        want_idx, want_val = topk_teacher(teacher(input_ids=batch).logits, K)
    assert indices.dtype == torch.long and values.dtype == torch.float16
    torch.testing.assert_close(indices, want_idx.long())
    torch.testing.assert_close(values, want_val)
    copy = pickle.loads(pickle.dumps(cache))  # what a spawned worker gets: no arrays, re-mapped on use
    assert copy._arrays is None and len(pickle.dumps(cache)) < 2000
    torch.testing.assert_close(copy.lookup(batch)[1], values)


def test_bytes_per_token_is_recorded(teacher, tmp_path):
    out = write_topk_cache(teacher, _batches(_blocks(0)), tmp_path / "cache", k=K)
    meta = json.loads((out / "meta.json").read_text())
    tokens = 6 * SEQ
    files = sum(p.stat().st_size for p in out.iterdir() if p.name != "meta.json")
    assert meta["num_tokens"] == tokens
    assert meta["bytes_per_token"] == pytest.approx(files / tokens, abs=1e-3)
    assert (out / "indices.bin").stat().st_size == tokens * K * 4  # int32 ids
    assert (out / "values.bin").stat().st_size == tokens * K * 2  # float16 logits
    hashes = np.load(out / "block_hashes.npy")
    assert list(hashes) == [block_hash(b) for b in _blocks(0)]


def test_other_data_raises_naming_the_cache_and_the_difference(teacher, tmp_path):
    out = write_topk_cache(teacher, _batches(_blocks(0)), tmp_path / "cache", k=K, data_info={"text_files": ["a.txt"]})
    cache = TopKCache(out)
    with pytest.raises(TeacherCacheError, match="no block with the token ids of batch row 1") as err:
        cache.lookup(torch.stack([_blocks(0)[0], _blocks(1)[0]]))
    assert str(out) in str(err.value) and "a.txt" in str(err.value)
    with pytest.raises(TeacherCacheError, match=f"blocks of {SEQ} tokens.*max_length"):
        cache.lookup(_blocks(0)[:, :8])


def test_settings_that_do_not_fit_are_named(teacher, tmp_path):
    cache = TopKCache(write_topk_cache(teacher, _batches(_blocks(0)), tmp_path / "cache", k=K, model_id="org/tiny"))
    with pytest.raises(TeacherCacheError, match="vocabulary of 103 ids, the student has 50"):
        cache.check_compatible(vocab_size=50)
    with pytest.raises(TeacherCacheError, match="teacher_k`=10"):
        cache.check_compatible(k=10)
    with pytest.raises(TeacherCacheError, match="data.max_length`=32"):
        cache.check_compatible(seq_len=32)
    with pytest.raises(TeacherCacheError, match="allow_model_mismatch"):
        cache.check_compatible(model="other/model")
    cache.check_compatible(vocab_size=VOCAB, k=K, seq_len=SEQ, model="/some/folder/tiny")


def test_existing_output_is_refused_and_a_failed_write_leaves_nothing(teacher, tmp_path):
    out = write_topk_cache(teacher, _batches(_blocks(0)), tmp_path / "cache", k=K)
    with pytest.raises(FileExistsError, match="not empty"):
        write_topk_cache(teacher, _batches(_blocks(1)), out, k=K)
    mixed = _batches(_blocks(0)) + [{"input_ids": _blocks(1)[:, :8]}]
    with pytest.raises(ValueError, match="one length"):
        write_topk_cache(teacher, mixed, tmp_path / "broken", k=K)
    assert not (tmp_path / "broken").exists()
    (out / "values.bin").write_bytes(b"\0" * 10)
    with pytest.raises(TeacherCacheError, match="incomplete or corrupt"):
        TopKCache(out)


def test_cli_caches_the_training_blocks_of_the_datamodule(tiny_checkpoint, tiny_text, tmp_path):
    from lit_prune.data import PruneDataModule

    out = tmp_path / "cache"
    cache_teacher_main(["--model", str(tiny_checkpoint), "--text-files", str(tiny_text), "--max-length", "32",
                        "--batch-size", "4", "--val-fraction", "0.2", "--out", str(out), "--k", "3"])
    data = PruneDataModule(tokenizer=str(tiny_checkpoint), text_files=[str(tiny_text)], max_length=32,
                           val_fraction=0.2)
    data.setup("fit")
    cache = TopKCache(out)
    assert len(cache) == len(data.train_set) and cache.k == 3 and cache.seq_len == 32
    # In order: row i of the cache is training block i.
    assert [cache.rows[block_hash(b["input_ids"])] for b in data.train_set][:5] == list(range(5))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["data"]["max_length"] == 32 and meta["bytes_per_token"] >= 3 * 6
    other = data.train_set[0]["input_ids"].clone()
    other[5] = 4  # one token differs
    with pytest.raises(TeacherCacheError, match="no block"):
        cache.lookup(other[None])
