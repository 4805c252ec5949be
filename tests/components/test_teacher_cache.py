"""Teacher top-K cache: round trip, storage cost, and clear errors for data or settings that do not match."""

import json
import pickle

import numpy as np
import pytest
import torch
from tiny import VOCAB, tiny_model

from lit_prune.components.kd import SparseTeacher, topk_teacher, topk_with_tail
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
    assert (cache.kind, cache.variant) == ("topk", "tail")
    batch = blocks[[4, 1, 1]]  # shuffled, repeated
    sparse = cache.lookup(batch)
    with torch.no_grad():
        logits = teacher(input_ids=batch).logits
    want_idx, want_logp, want_tail = topk_with_tail(logits, K)
    assert isinstance(sparse, SparseTeacher) and sparse.indices.dtype == torch.long
    torch.testing.assert_close(sparse.indices, want_idx)
    torch.testing.assert_close(sparse.logprobs, want_logp, atol=5e-3, rtol=1e-3)  # float16 on disk
    torch.testing.assert_close(sparse.tail, want_tail, atol=5e-3, rtol=1e-3)
    # K ids + tail hold all the mass: the cache stores probabilities over the full vocabulary, not renormalised.
    total = sparse.logprobs.exp().sum(-1) + sparse.tail.exp()
    torch.testing.assert_close(total, torch.ones_like(total), atol=5e-3, rtol=0)
    # The paper's (E3) variant reads the same cache renormalised over the K ids.
    indices, values = TopKCache(out, variant="renormalized").lookup(batch)
    want_idx32, want_val = topk_teacher(logits, K)
    torch.testing.assert_close(indices, want_idx32.long())
    torch.testing.assert_close(values.float().softmax(-1), want_val.float().softmax(-1), atol=2e-3, rtol=1e-3)
    copy = pickle.loads(pickle.dumps(cache))  # what a spawned worker gets: no arrays, re-mapped on use
    assert copy._arrays is None and len(pickle.dumps(cache)) < 2000
    torch.testing.assert_close(copy.lookup(batch).logprobs, sparse.logprobs)


def test_bytes_per_token_is_recorded(teacher, tmp_path):
    out = write_topk_cache(teacher, _batches(_blocks(0)), tmp_path / "cache", k=K)
    meta = json.loads((out / "meta.json").read_text())
    tokens = 6 * SEQ
    files = sum(p.stat().st_size for p in out.iterdir() if p.name != "meta.json")
    assert meta["num_tokens"] == tokens and meta["version"] == 2 and meta["kind"] == "topk"
    assert meta["bytes_per_token"] == pytest.approx(files / tokens, abs=1e-3)
    assert (out / "indices.bin").stat().st_size == tokens * K * 2  # uint16 ids: the vocabulary fits
    assert (out / "values.bin").stat().st_size == tokens * K * 2  # float16 log-probs
    assert (out / "tail.bin").stat().st_size == tokens * 2  # float16 log tail mass
    hashes = np.load(out / "block_hashes.npy")
    assert list(hashes) == [block_hash(b) for b in _blocks(0)]


def test_sampled_cache_stores_distinct_ids_with_counts(teacher, tmp_path):
    draws = 7
    out = write_topk_cache(teacher, _batches(_blocks(0)), tmp_path / "cache", k=draws, kind="sampled", seed=3)
    cache = TopKCache(out)
    assert (cache.kind, cache.variant) == ("sampled", "sampled")
    sparse = cache.lookup(_blocks(0)[:2])
    assert (sparse.counts.sum(-1) == draws).all()
    used = sparse.counts > 0
    for ids, mask in zip(sparse.indices.reshape(-1, draws), used.reshape(-1, draws)):
        assert len(set(ids[mask].tolist())) == int(mask.sum())  # distinct ids, left-aligned
        assert mask.tolist() == sorted(mask.tolist(), reverse=True)
    with torch.no_grad():
        logp = torch.log_softmax(teacher(input_ids=_blocks(0)[:2]).logits, -1)
    torch.testing.assert_close(torch.where(used, sparse.logprobs, 0.0),
                               torch.where(used, logp.gather(-1, sparse.indices), 0.0), atol=5e-3, rtol=1e-3)
    again = write_topk_cache(teacher, _batches(_blocks(0)), tmp_path / "again", k=draws, kind="sampled", seed=3)
    assert (again / "counts.bin").read_bytes() == (out / "counts.bin").read_bytes()  # seeded: reproducible
    assert (out / "counts.bin").stat().st_size == 6 * SEQ * draws
    with pytest.raises(TeacherCacheError, match="sampled.*cannot give the `model.init_args.cache_variant: tail`"):
        TopKCache(out, variant="tail")
    with pytest.raises(ValueError, match="draws per token"):
        write_topk_cache(teacher, _batches(_blocks(0)), tmp_path / "x", k=300, kind="sampled")


def test_a_format_v1_cache_is_read_for_the_paper_variant_only(teacher, tmp_path):
    blocks = _blocks(0)
    out = write_topk_cache(teacher, _batches(blocks), tmp_path / "cache", k=K)
    # Rewrite it as v1 wrote it: int32 ids, raw float16 top-K logits, no tail.
    with torch.no_grad():
        idx, val = topk_teacher(teacher(input_ids=blocks).logits, K)
    (out / "indices.bin").write_bytes(idx.numpy().astype(np.int32).tobytes())
    (out / "values.bin").write_bytes(val.numpy().tobytes())
    (out / "tail.bin").unlink()
    meta = json.loads((out / "meta.json").read_text())
    meta.update(version=1, index_dtype="int32")
    del meta["kind"]
    (out / "meta.json").write_text(json.dumps(meta))
    cache = TopKCache(out)
    assert (cache.kind, cache.variant) == ("topk_logits", "renormalized")
    indices, values = cache.lookup(blocks[:2])
    torch.testing.assert_close(values, val[:2])
    with pytest.raises(TeacherCacheError, match="version 1.*cache-teacher"):
        TopKCache(out, variant="tail")
    meta["version"] = 7
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TeacherCacheError, match="version 7.*Rebuild the cache: python -m lit_prune cache-teacher"):
        TopKCache(out)


def test_check_blocks_refuses_other_data_before_training(teacher, tmp_path):
    out = write_topk_cache(teacher, _batches(_blocks(0)), tmp_path / "cache", k=K, data_info={"text_files": ["a.txt"]})
    cache = TopKCache(out)
    cache.check_blocks(_blocks(0)[[3, 0]])
    cache.check_blocks([{"input_ids": b} for b in _blocks(0)])
    with pytest.raises(TeacherCacheError, match=r"lacks 2 of the 3 training blocks.*first: block 1.*a\.txt"):
        cache.check_blocks([_blocks(0)[0], *_blocks(1)[:2]])
    with pytest.raises(TeacherCacheError, match="blocks of 16 tokens.*max_length"):
        cache.check_blocks(_blocks(0)[:, :8])


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
    assert meta["data"]["max_length"] == 32 and meta["bytes_per_token"] >= 3 * 4 + 2  # uint16 ids, fp16 values, tail
    other = data.train_set[0]["input_ids"].clone()
    other[5] = 4  # one token differs
    with pytest.raises(TeacherCacheError, match="no block"):
        cache.lookup(other[None])
