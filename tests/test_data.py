import json

import pytest
import torch

from lit_prune.data import DataConfigError, PruneDataModule, expand_text_files


def _dm(tiny_checkpoint, **kwargs):
    kwargs.setdefault("max_length", 32)
    kwargs.setdefault("batch_size", 2)
    return PruneDataModule(tokenizer=str(tiny_checkpoint), **kwargs)


def test_text_blocks_split_and_batches(tiny_checkpoint, tiny_text, tmp_path):
    dm = _dm(tiny_checkpoint, text_files=[str(tiny_text)], val_fraction=0.25, cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    total = len(dm.train_set) + len(dm.val_set)
    num_chars = len(tiny_text.read_text())
    # The char tokenizer gives one token per character, plus BOS-free tokenization and one EOS per document.
    assert total == (num_chars + 1) // 32
    assert len(dm.val_set) == round(total * 0.25)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 32) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"], batch["labels"])
    # The validation blocks are the tail of the token stream, in order.
    val_ids = torch.cat([b["input_ids"].flatten() for b in dm.val_dataloader()])
    tok = dm.tokenizer
    text = "".join(tok.convert_ids_to_tokens(val_ids.tolist()))
    assert text in tiny_text.read_text()


def test_split_and_shuffle_are_deterministic(tiny_checkpoint, tiny_text):
    first = _dm(tiny_checkpoint, text_files=[str(tiny_text)], seed=3)
    second = _dm(tiny_checkpoint, text_files=[str(tiny_text)], seed=3)
    first.setup(), second.setup()
    a = next(iter(first.train_dataloader()))["input_ids"]
    b = next(iter(second.train_dataloader()))["input_ids"]
    assert torch.equal(a, b)


def test_instruction_records_mask_the_prompt(tiny_checkpoint, tmp_path):
    path = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": f"Say {i}", "input": "", "output": f"Answer number {i}."} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = _dm(tiny_checkpoint, text_files=[str(path)], prompt_field="instruction", input_field="input",
             response_field="output", val_fraction=0.0)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    masked = batch["labels"] == -100
    assert masked.any() and (~masked).any()
    assert torch.equal(batch["labels"][~masked], batch["input_ids"][~masked])
    assert dm.val_dataloader() == []


def test_parquet_source(tiny_checkpoint, tmp_path, tiny_text):
    import datasets

    path = tmp_path / "data.parquet"
    datasets.Dataset.from_dict({"body": [tiny_text.read_text()] * 2}).to_parquet(path)
    dm = _dm(tiny_checkpoint, text_files=[str(path)], text_field="body")
    dm.setup()
    assert len(dm.train_set) > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(text_files=["/nonexistent/*.txt"]), "matches no file"),
        (dict(), "exactly one of"),
        (dict(text_files=["x"], dataset="wikitext"), "exactly one of"),
        (dict(text_files=["{text}"], prompt_field="q"), "both `data.prompt_field`"),
        (dict(text_files=["{text}"], max_length=0), "data.max_length"),
        (dict(text_files=["{text}"], val_fraction=1.0), "data.val_fraction"),
    ],
)
def test_bad_config_is_rejected_at_construction(tiny_checkpoint, tiny_text, kwargs, message):
    kwargs = {k: ([str(tiny_text)] if v == ["{text}"] else v) for k, v in kwargs.items()}
    with pytest.raises(DataConfigError, match=message):
        PruneDataModule(tokenizer=str(tiny_checkpoint), **kwargs)


def test_missing_field_empty_and_too_long(tiny_checkpoint, tiny_text, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(DataConfigError, match=r"no column\(s\) \['text'\].*Available columns: \['content'\]"):
        _dm(tiny_checkpoint, text_files=[str(path)]).setup()
    with pytest.raises(DataConfigError, match="fewer than one block"):
        _dm(tiny_checkpoint, text_files=[str(path)], text_field="content").setup()
    with pytest.raises(DataConfigError, match="longer than the model's context"):
        _dm(tiny_checkpoint, text_files=[str(tiny_text)], max_length=4096).setup()
    with pytest.raises(DataConfigError, match="suffixes"):
        (tmp_path / "a.csv").write_text("x")
        expand_text_files([str(tmp_path / "a.csv")])


@pytest.fixture(scope="module")
def bos_checkpoint(tmp_path_factory):
    """The tiny checkpoint's config with a character tokenizer that puts its BOS before encoded text (as Gemma's)."""
    from tiny import char_tokenizer, tiny_model
    from tokenizers import processors

    path = tmp_path_factory.mktemp("bos-tokenizer")
    tok = char_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save_pretrained(path)
    tiny_model("llama").config.save_pretrained(path)
    return path


def _blocks(dm):
    blocks = dm.build_blocks()
    return [list(map(int, b)) for b in blocks["input_ids"]], [list(map(int, b)) for b in blocks["labels"]]


def test_bos_per_block_auto_keeps_plain_blocks_for_tokenizers_without_bos(tiny_checkpoint, tiny_text, tmp_path):
    # SmolLM2-like: the tokenizer has a BOS token but does not prepend it, so auto == false == the plain cut.
    docs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    docs[0].write_text(tiny_text.read_text()[:900])
    docs[1].write_text(tiny_text.read_text()[:700])
    auto = _blocks(_dm(tiny_checkpoint, text_files=[str(d) for d in docs]))
    off = _blocks(_dm(tiny_checkpoint, text_files=[str(d) for d in docs], bos_per_block=False))
    assert auto == off
    tok = _dm(tiny_checkpoint, text_files=[str(docs[0])]).tokenizer
    stream = [t for d in docs for t in tok(d.read_text())["input_ids"] + [tok.eos_token_id]]
    assert auto[0] == [stream[i : i + 32] for i in range(0, len(stream) // 32 * 32, 32)]
    assert auto[1] == auto[0]


def test_bos_per_block_true_puts_a_context_bos_before_every_block(tiny_checkpoint, tiny_text):
    dm = _dm(tiny_checkpoint, text_files=[str(tiny_text)], bos_per_block=True)
    ids, labels = _blocks(dm)
    bos, tok = dm.tokenizer.bos_token_id, dm.tokenizer
    stream = tok(tiny_text.read_text())["input_ids"] + [tok.eos_token_id]
    assert all(len(b) == 32 and b[0] == bos for b in ids)
    assert all(lab[0] == -100 and lab[1:] == b[1:] for b, lab in zip(ids, labels))
    # 31 text tokens per block, in stream order, nothing skipped.
    assert [t for b in ids for t in b[1:]] == stream[: len(ids) * 31]
    assert len(ids) == len(stream) // 31


def test_bos_per_block_auto_for_a_tokenizer_that_adds_bos(bos_checkpoint, tiny_text, tmp_path):
    docs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    docs[0].write_text(tiny_text.read_text()[:900])
    docs[1].write_text(tiny_text.read_text()[:700])
    dm = _dm(bos_checkpoint, text_files=[str(d) for d in docs])
    tok = dm.tokenizer
    bos = tok.bos_token_id
    stream = [t for d in docs for t in tok(d.read_text())["input_ids"] + [tok.eos_token_id]]
    assert stream[0] == bos and stream.count(bos) == 2  # each record opens with the tokenizer's own BOS
    ids, labels = _blocks(dm)
    assert all(len(b) == 32 and b[0] == bos and b[1] != bos for b in ids)  # every block, never a doubled BOS
    assert all(lab[0] == -100 and lab[1:] == b[1:] for b, lab in zip(ids, labels))
    # Dropping the added BOSes gives back the stream: the first block keeps the record's own BOS, the others get one.
    assert ids[0] == stream[:32]
    assert ids[0] + [t for b in ids[1:] for t in b[1:]] == stream[: 32 + 31 * (len(ids) - 1)]
    off, _ = _blocks(_dm(bos_checkpoint, text_files=[str(d) for d in docs], bos_per_block=False))
    assert off == [stream[i : i + 32] for i in range(0, len(stream) // 32 * 32, 32)]
    assert sum(b[0] == bos for b in off) < len(off)
    # Resume and split logic work on whole blocks, unchanged: setup splits the same blocks.
    dm.setup("fit")
    assert [list(map(int, b)) for b in dm.train_set["input_ids"]] + \
        [list(map(int, b)) for b in dm.val_set["input_ids"]] == ids


def test_bos_per_block_bad_values(tiny_checkpoint, tiny_text, tmp_path):
    with pytest.raises(DataConfigError, match="bos_per_block"):
        _dm(tiny_checkpoint, text_files=[str(tiny_text)], bos_per_block="yes")
    with pytest.raises(DataConfigError, match="max_length >= 2"):
        _dm(tiny_checkpoint, text_files=[str(tiny_text)], bos_per_block=True, max_length=1).build_blocks()


def test_calibration_indices_spread_over_the_whole_training_set():
    from lit_prune.data import calibration_indices

    picked = calibration_indices(100, 8)
    assert picked == sorted(set(picked)) and len(picked) == 8
    # one block from each eighth of the data, so a corpus of several files is represented by all of them
    assert [i * 8 // 100 for i in picked] == list(range(8))
    assert calibration_indices(100, 8, "first") == list(range(8))
    assert calibration_indices(5, 8) == list(range(5)) == calibration_indices(5, 8, "first")  # fewer blocks than asked
    with pytest.raises(ValueError, match="'spread' or 'first'.*'random'"):
        calibration_indices(100, 8, "random")
