"""The quality table: dense vs pruned (and recovered) models on six zero-shot tasks and held-out perplexity.

Each mask is exported once into a vanilla smaller checkpoint; the dense model, the pruned models and any recovered
model folders are then scored by ``lit_prune.evaluate_models.evaluate`` on the same rows (lm-eval's prompts and
metrics, offline data from :mod:`lit_prune.tasks`) and on held-out text. Its results folder is resumable, so a long
run can be spread over sessions (``--eval-dir`` keeps it). Writes raw JSON, a Markdown table with standard errors,
retentions and paired differences against a chosen reference row, and a retention-vs-speed-up plot.

CPU, a quick look (SmolLM2, 100 rows per task)::

    python -m benchmarks.quality --model offline:smollm2-135m --masks clp=runs/.../mask.json sleb=.../mask.json \
        --limit 100 --dtype bfloat16 --tag smollm2_cpu_limit100

GPU without network, data carried as extracted Arrow folders (``python -m lit_prune assets`` prints where they are)::

    python -m benchmarks.quality --model /data/smollm2 --data-dir /data/tasks --text-files /data/britannica-11th.txt \
        --masks ... --recovered lora=runs/.../pruned:clp --tag smollm2_h100

Held-out perplexity: by default the whole 1911 Britannica article (``offline:britannica``, ``--val-fraction 0``),
so masks and recoveries must be searched and trained on other text (the plays, ``offline:shakespeare``): the JSON
keeps each mask file's ``extra`` (search settings, where the run wrote them) so this can be checked. Every
perplexity window starts with the tokenizer's BOS (context only): Gemma 3 270M scores 100.0 without it and 26.0 with
it on the same 8 x 256 Britannica tokens. Speed-up is the ideal layer ratio (dense layers / kept layers) unless
``--speedups NAME=X`` gives a measured one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import machine
from lit_prune.assets import cache_root
from lit_prune.evaluate_models import load_rows, paired_versus, prepare_out_dir
from lit_prune.tasks import OFFLINE_TASKS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TASKS = list(OFFLINE_TASKS)


def _named(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def load_masks(masks: list[tuple[str, str]], search_json: str | None, num_drop: int | None) -> dict[str, Any]:
    """``{name: MaskArtifact or {"drop", "method", "seconds"}}`` from mask.json files and/or a
    ``benchmarks/search_quality.py`` results file (whose masks get their layer count from the dense model)."""
    from lit_prune.components.mask_io import load_mask

    out: dict[str, Any] = {name: load_mask(path) for name, path in masks}
    if search_json:
        data = json.loads(Path(search_json).read_text())
        picked = [r for r in data["ratios"].values() if num_drop is None or r["num_drop"] == num_drop]
        if not picked:
            budgets = sorted(r["num_drop"] for r in data["ratios"].values())
            raise SystemExit(f"--search-json {search_json}: no budget with --num-drop {num_drop}; it has {budgets}.")
        for budget in picked:
            for method, res in budget["methods"].items():
                out[f"{method}_d{budget['num_drop']}"] = {"drop": res["drop"], "method": method,
                                                           "seconds": res.get("seconds")}
    return out


def export_masks(
    model: str, masks: dict[str, Any], work_dir: Path, dtype: str
) -> tuple[dict[str, str], dict[str, str]]:
    """Export every distinct mask once into ``work_dir/<name>`` (reused when already there).

    Returns:
        ``({name: folder}`` of the masks to score, ``{name: first name with the same layers})`` for the others, which
        get a copy of that row instead of being scored twice.
    """
    from lit_prune import hf
    from lit_prune.components.checkpoint import export_from_mask
    from lit_prune.components.mask_io import MaskArtifact

    num_layers = int(hf.load_config(model, key="--model").num_hidden_layers)
    folders: dict[str, str] = {}
    same_as: dict[str, str] = {}
    seen: dict[tuple[int, ...], str] = {}
    for name, mask in masks.items():
        if isinstance(mask, dict):
            mask = masks[name] = MaskArtifact.from_dict({
                "model": model, "num_layers": num_layers, "drop": mask["drop"], "method": mask["method"],
                "extra": {"seconds": mask["seconds"]},
            })
        key = tuple(sorted(mask.drop))
        if key in seen:
            same_as[name] = seen[key]
            continue
        seen[key] = name
        folder = work_dir / name
        if not (folder / "config.json").is_file():
            export_from_mask(model, mask, folder, overwrite=True, dtype=dtype, allow_model_mismatch=True)
        folders[name] = str(folder)
    return folders, same_as


def _mask_seconds(mask: Any) -> float | None:
    extra = getattr(mask, "extra", None) or {}
    for key in ("seconds", "time_to_mask_s", "search_seconds"):
        if isinstance(extra.get(key), (int, float)):
            return float(extra[key])
    return None


def _per_row(eval_dir: Path, name: str, tasks: list[str]) -> dict[str, dict[str, list]]:
    """``evaluate``'s per-row scores of one model, for the tasks it has them for."""
    return {t: rows for t in tasks if (rows := load_rows(eval_dir, name, t))}


def build_rows(results: dict[str, Any], eval_dir: Path, reference: str, masks: dict[str, Any],
               info: dict[str, dict[str, Any]], speedups: dict[str, float]) -> list[dict[str, Any]]:
    """One row per model: accuracies, average, both retentions, ppl, speed-up, paired differences vs ``reference``."""
    tasks = results["protocol"]["tasks"]
    models = results["models"]
    dense_name = results["reference"]
    dense_layers = models[dense_name]["num_layers"]
    rows = []
    for name, entry in models.items():
        ret = entry.get("retention") or {}
        paired: dict[str, Any] = {}
        if name != reference:
            paired = paired_versus(_per_row(eval_dir, reference, tasks), _per_row(eval_dir, name, tasks),
                                   {t: entry["tasks"][t] for t in tasks})
        mask = masks.get(name)
        rows.append({
            "name": name, "model": entry["model"], "num_layers": entry["num_layers"],
            "drop": list(mask.drop) if mask is not None else None,
            "method": mask.method if mask is not None else info.get(name, {}).get("method"),
            "accuracy": {t: {k: entry["tasks"][t][k] for k in ("value", "stderr", "n", "split", "metric")}
                         for t in tasks},
            "average": entry.get("average"),
            "retention": {"tasks": ret.get("tasks"), "mean_of_ratios": ret.get("mean_of_ratios"),
                          "ratio_of_means": ret.get("ratio_of_means"), "ppl": ret.get("ppl")},
            "ppl": (entry.get("ppl") or {}).get("ppl"),
            "speedup": speedups.get(name, dense_layers / entry["num_layers"]),
            "speedup_kind": "measured" if name in speedups else "ideal (dense layers / kept layers)",
            "mask_seconds": _mask_seconds(mask) if mask is not None else None,
            "mask_extra": dict(mask.extra) if mask is not None else None,
            "paired_vs_reference": paired or None,
            **{k: v for k, v in info.get(name, {}).items() if k not in ("method",)},
        })
    return rows


def _pm(value, stderr, scale=100.0) -> str:
    if value is None:
        return "-"
    return f"{value * scale:.1f}" + ("" if stderr is None else f" ± {stderr * scale:.1f}")


def _diff(d) -> str:
    if not d:
        return "-"
    text = f"{d['diff'] * 100:+.1f}" + ("" if d.get("stderr") is None else f" ± {d['stderr'] * 100:.1f}")
    return text + ("" if d.get("distinguishable") else " (n.s.)")


def markdown(payload: dict[str, Any]) -> str:
    tasks = payload["protocol"]["tasks"]
    ref = payload["paired_reference"]
    head = (["model", "layers", "drop"] + tasks + ["avg", f"Δavg vs {ref}", "ret. (mean of ratios)",
            "ret. (ratio of means)", "held-out ppl", "ppl ret.", "speed-up", "mask s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in payload["rows"]:
        ret = row["retention"]
        cells = [row["name"], str(row["num_layers"]), ",".join(map(str, row["drop"])) if row["drop"] else "-"]
        cells += [_pm(row["accuracy"][t]["value"], row["accuracy"][t]["stderr"]) for t in tasks]
        avg = row.get("average") or {}
        cells += [_pm(avg.get("value"), avg.get("stderr")),
                  "reference" if row["name"] == ref else _diff((row["paired_vs_reference"] or {}).get("average")),
                  "-" if ret["mean_of_ratios"] is None else f"{ret['mean_of_ratios']:.3f}",
                  "-" if ret["ratio_of_means"] is None else f"{ret['ratio_of_means']:.3f}",
                  "-" if row["ppl"] is None else f"{row['ppl']:.2f}",
                  "-" if ret["ppl"] is None else f"{ret['ppl']:.3f}",
                  f"{row['speedup']:.2f}", "-" if row["mask_seconds"] is None else f"{row['mask_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    diffs = ["| model | " + " | ".join(f"{t} Δ" for t in tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for row in payload["rows"]:
        if row["name"] != ref:
            per = (row["paired_vs_reference"] or {}).get("tasks") or {}
            diffs.append(f"| {row['name']} | " + " | ".join(_diff(per.get(t)) for t in tasks) + " |")
    proto = payload["protocol"]
    ppl = proto.get("perplexity") or {}
    first = payload["rows"][0]["accuracy"] if payload["rows"] else {}
    splits = ", ".join(f"{t}: {first[t]['split']} ({first[t]['n']} rows)" for t in tasks if t in first)
    notes = [
        f"Machine: {payload['machine']}; date {payload['date']}; dtype {proto['dtype']}; lm-eval "
        f"{proto['lm_eval_version']}, 0-shot, limit {proto['limit']}.",
        f"Splits scored: {splits}.",
        "Accuracy in %, ± standard error. Δ = paired difference to the reference row on the same rows (per-row "
        "differences, ± their standard error); (n.s.) = within 1.96 standard errors, i.e. not distinguishable.",
        "Retention vs the dense model: mean of per-task ratios, and ratio of mean accuracies. Held-out ppl: "
        f"{ppl.get('data_source', '-')}, {ppl.get('num_scored_tokens', '-')} "
        "scored tokens; ppl ret. = dense ppl / model ppl. Speed-up: ideal layer ratio unless measured.",
    ]
    shared = [f"`{r['name']}` = `{r['same_layers_as']}`" for r in payload["rows"] if r.get("same_layers_as")]
    if shared:
        notes.append("Same layers, so the same scores (scored once): " + ", ".join(shared) + ".")
    return ("\n".join(lines) + "\n\nPer-task paired differences (accuracy points):\n\n" + "\n".join(diffs) + "\n\n"
            + "\n\n".join(notes) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="offline:smollm2-135m", help="Dense model (the retention reference).")
    parser.add_argument("--masks", nargs="*", type=_named, default=[], metavar="NAME=MASK_JSON")
    parser.add_argument("--search-json", help="A benchmarks/search_quality.py results file: its masks become rows.")
    parser.add_argument("--num-drop", type=int, help="With --search-json: only this budget (layers dropped).")
    parser.add_argument("--recovered", nargs="*", type=_named, default=[], metavar="NAME=DIR",
                        help="Recovered (or otherwise pruned) model folders.")
    parser.add_argument("--info", help="JSON {name: {method, train_tokens, train_seconds, ...}} added to the rows.")
    parser.add_argument("--speedups", nargs="*", type=_named, default=[], metavar="NAME=X",
                        help="Measured speed-ups (default: the ideal layer ratio).")
    parser.add_argument("--reference", default="dense", help="Row that paired differences are taken against.")
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    parser.add_argument("--limit", type=int, default=None, help="First N rows per task (default: all).")
    parser.add_argument("--data-dir", default=None, help="Extracted task folders (default: the lit_prune cache).")
    parser.add_argument("--text-files", nargs="+", default=["offline:britannica"],
                        help="Held-out text for perplexity (default: the Britannica article).")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-blocks", type=int, default=None)
    parser.add_argument("--no-bos-per-window", action="store_true",
                        help="Score perplexity windows without a BOS before each (default: with; Gemma needs it).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--tag", required=True, help="Output name: docs/results/quality_<tag>.{json,md,png}.")
    parser.add_argument("--results-dir", default=str(ROOT / "docs" / "results"))
    parser.add_argument("--work-dir", default=None, help="Exported masks and evaluate's resumable results "
                        "(default: runs/quality/<tag>).")
    args = parser.parse_args(argv)

    from lit_prune.evaluate_models import evaluate

    work = Path(args.work_dir or ROOT / "runs" / "quality" / args.tag)
    masks = load_masks(args.masks, args.search_json, args.num_drop)
    names = ["dense"] + list(masks) + [n for n, _ in args.recovered]
    if len(set(names)) != len(names) or args.reference not in names:
        raise SystemExit(f"row names must be unique and include --reference {args.reference!r}; got {names}.")
    info = json.loads(Path(args.info).read_text()) if args.info else {}
    start = time.time()
    folders, same_as = export_masks(args.model, masks, work / "models", args.dtype)
    models = {"dense": args.model, **folders, **dict(args.recovered)}
    eval_dir = work / "eval"
    resume = (eval_dir / "results.json").is_file()
    if not resume:
        prepare_out_dir(eval_dir, overwrite=True)
    try:
        results = evaluate(
            models, out=eval_dir, text_files=args.text_files, max_length=args.max_length, val_fraction=0.0,
            max_blocks=args.max_blocks, batch_size=args.batch_size, tasks=args.tasks, limit=args.limit,
            data_dir=args.data_dir, dtype=args.dtype, device=args.device, resume=resume, overwrite=not resume,
            bos_per_window=not args.no_bos_per_window,
        )
    except ValueError as err:
        if "other settings" not in str(err):
            raise
        raise SystemExit(f"{err} ({eval_dir} holds a stopped run with other settings: pass another --work-dir or "
                         "--tag, or delete that folder.)") from None
    payload = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d"), "seconds": time.time() - start,
        "command": "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
        "protocol": results["protocol"], "paired_reference": args.reference,
        "rows": build_rows(results, eval_dir, args.reference, masks, info, {n: float(x) for n, x in args.speedups}),
    }
    for name, first in same_as.items():  # same layers as a scored mask: same scores, its own method and time
        row = dict(next(r for r in payload["rows"] if r["name"] == first))
        mask = masks[name]
        row.update(name=name, method=mask.method, mask_seconds=_mask_seconds(mask), mask_extra=dict(mask.extra),
                   same_layers_as=first)
        payload["rows"].insert([r["name"] for r in payload["rows"]].index(first) + 1, row)
    # Machine-independent paths in the record.
    text = json.dumps(payload).replace(str(cache_root()), "$LIT_PRUNE_HOME")
    payload = json.loads(text)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality_{args.tag}.json").write_text(json.dumps(payload, indent=1) + "\n")
    md = markdown(payload)
    (out / f"quality_{args.tag}.md").write_text(md)
    points = [{"name": r["name"], "retention": r["retention"]["ratio_of_means"], "speedup": r["speedup"]}
              for r in payload["rows"] if r["retention"]["ratio_of_means"] is not None]
    if points:
        from lit_prune.reports import retention_speedup_png

        retention_speedup_png(points, out / f"quality_{args.tag}.png",
                              title=f"{args.model}: accuracy retention (ratio of means) vs speed-up")
    print(md)
    print(f"wrote {out / f'quality_{args.tag}.json'} and .md/.png ({payload['seconds']:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
