"""Recovery variants x seeds on one GPU, as parallel worker processes: held-out perplexity and benchmark tasks.

    python -m benchmarks.recovery_matrix --model offline:smollm2-135m --text offline:britannica \
        --train-text offline:britannica offline:shakespeare --mask configs/masks/smollm2_drop_12_20.json \
        --steps 250 --batch 16 --seq 256 --seeds 0 1 2 --teacher-seeds 0 --parallel 8 --limit 300 \
        --data-dir TASKS --results-dir results/recovery_matrix --work-dir WORK

Three families of KD runs (forward KL, temperature 1, no CE, LoRA on every kept layer, bf16, as
``benchmarks.cached_kd``), every one on the same number of tokens (``--steps x --batch x --seq``):

- ``--teachers`` x ``--teacher-seeds``, weighting ``none``: the teacher's form at equal tokens (issue 14 part 1):
  ``online`` (the dense teacher live), ``tail_K`` (cache v2 top-K + tail), ``renormalized_K`` (E3-Pruner's
  renormalised top-K), ``sampled_N`` (random-sampling KD). Each cache is built once, by its own worker, before the
  runs that read it start.
- ``online`` x ``--weightings`` x ``--seeds`` (part 2): ``none``, ``normalized``, ``linear`` (teacher entropy) and
  ``student_selective`` (SE-KD: only the ``--select-fraction`` of tokens where the student is most uncertain).
- ``--compensated-seeds`` (part 3): online KD, weighting ``none``, from the cut with the linear compensation folded in
  (``components/compensate.py``, fitted once on the first ``--compensate-tokens`` training tokens, unshuffled).

A run is one fresh process (``python -m benchmarks.recovery_matrix --worker run ...``): seed everything (the LoRA
init) and the batch order with its seed, ``Distill`` fit, held-out perplexity (the tail of ``--text``, which training
never sees), the merged model saved as a plain Hugging Face folder under ``--work-dir``, then the benchmark tasks on it
(lm-eval through ``lit_prune.evaluate_models``, the first ``--limit`` rows of each). ``dense`` and ``pruned`` (plain
export) are scored once the same way. Up to ``--parallel`` workers share the GPU (the runs are launch-bound: a 135M
model leaves it mostly idle).

Resumable: every job writes its JSON under ``--results-dir`` (a run writes its perplexity as soon as it has it, then
again with its tasks); a second call skips what is there, so a cut call loses only the jobs in flight.
``--aggregate-only`` prints the table from what is there. The table: per variant mean +- std over seeds of held-out
perplexity, gap closed, share of online KD's gap, task average accuracy (+ the row sampling error of one run, and the
paired difference against online KD on the same rows), bytes per token, train seconds; written as ``summary.json``
and ``summary.md`` in ``--results-dir`` (and ``--out`` if given).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L

from benchmarks._common import (
    KD_VARIANT_FORMS,
    add_recovery_arguments,
    cache_name,
    machine,
    parse_kd_variant,
    write_json,
)
from lit_prune.tasks import OFFLINE_TASKS

WEIGHTINGS = ("none", "normalized", "linear", "student_selective")
REFERENCE = "online-none"  # the row every other one is compared with
COMPENSATED = "linear_comp+online-none"  # online KD from the compensated cut (issue 14, part 3)


def config_name(run: dict[str, Any]) -> str:
    """The table row of a run: teacher-weighting, prefixed when KD starts from the compensated cut."""
    return COMPENSATED if run.get("compensate") else f"{run['teacher']}-{run['weighting']}"
START = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - START:5.0f}s] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ the plan
def plan_runs(args) -> list[dict[str, Any]]:
    """Every (teacher, weighting, seed) run, each once, teacher-form runs first."""
    runs: dict[str, dict[str, Any]] = {}
    for teacher in args.teachers:
        for seed in args.teacher_seeds:
            runs.setdefault(f"{teacher}-none-s{seed}", dict(teacher=teacher, weighting="none", seed=seed))
    for weighting in args.weightings:
        for seed in args.seeds:
            runs.setdefault(f"online-{weighting}-s{seed}", dict(teacher="online", weighting=weighting, seed=seed))
    for seed in args.compensated_seeds:
        runs.setdefault(f"{COMPENSATED}-s{seed}", dict(teacher="online", weighting="none", seed=seed, compensate=True))
    for name, run in runs.items():
        run.setdefault("compensate", False)
        run["name"], run["config"] = name, config_name(run)
    return list(runs.values())


def check_args(args) -> None:
    for teacher in args.teachers:
        try:
            parse_kd_variant(teacher)
        except ValueError as err:
            raise SystemExit(f"--teachers: {err}") from None
    bad = [w for w in args.weightings if w not in WEIGHTINGS]
    if bad:
        raise SystemExit(f"--weightings {bad}: choose from {list(WEIGHTINGS)}.")
    unknown = [t for t in args.tasks if t not in OFFLINE_TASKS]
    if unknown:
        raise SystemExit(f"--tasks {unknown}: choose from the offline tasks {list(OFFLINE_TASKS)}.")
    if args.parallel < 1:
        raise SystemExit("--parallel must be >= 1.")


def paths(args) -> dict[str, Path]:
    results, work = Path(args.results_dir), Path(args.work_dir)
    return {"results": results, "runs": results / "runs", "reference": results / "reference",
            "caches": results / "caches", "logs": results / "logs", "work": work, "blocks": work / "blocks.pt",
            "cache_dir": work / "caches", "models": work / "models", "eval": work / "eval"}


# ------------------------------------------------------------------------------------------------ workers
def _blocks(args):
    import torch

    return torch.load(paths(args)["blocks"], weights_only=True)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def score_tasks(args, name: str, folder: Path) -> dict[str, Any] | None:
    """Benchmark tasks on a saved model folder: per task value, stderr, rows scored, and the per-row metric."""
    if not args.tasks:
        return None
    from lit_prune.evaluate_models import average_accuracy, evaluate, load_rows

    out = paths(args)["eval"] / name
    results = evaluate({name: str(folder)}, out=out, tasks=args.tasks, limit=args.limit, data_dir=args.data_dir,
                       dtype="bfloat16", batch_size=args.eval_batch, overwrite=True, plot=False,
                       progress=lambda message: print(message, flush=True))
    tasks = {}
    for task, result in results["models"][name]["tasks"].items():
        key = (result.get("metric") or "acc").split(",")[0]
        rows = load_rows(out, name, task) or {}
        tasks[task] = {"metric": result.get("metric"), "value": result.get("value"), "stderr": result.get("stderr"),
                       "n": result.get("n"), "doc_id": rows.get("doc_id"), "rows": rows.get(key)}
    return {"tasks": tasks, "average": average_accuracy(tasks)}


def worker_cache(args) -> None:
    from benchmarks._common import build_teacher_cache

    data = _blocks(args)
    start = time.perf_counter()
    meta = build_teacher_cache(data["folder"], data["train"], args.batch, paths(args)["cache_dir"], args.name,
                               args.model, _device())
    write_json(str(paths(args)["caches"] / f"{args.name}.json"),
               {**meta, "wall_s": time.perf_counter() - start, "machine": machine()})


def worker_reference(args) -> None:
    """``dense`` or ``pruned`` (the plain export): held-out perplexity, then the tasks."""
    import torch

    from benchmarks._common import perplexity
    from lit_prune.components.checkpoint import export_from_mask
    from lit_prune.hf import load_causal_lm

    data, device = _blocks(args), _device()
    folder = Path(data["folder"])
    if args.name == "pruned":
        folder = paths(args)["models"] / "pruned"
        if not (folder / "config.json").exists():
            export_from_mask(data["folder"], args.mask, folder, overwrite=True, dtype="bfloat16",
                             allow_model_mismatch=True)
    model = load_causal_lm(str(folder), "bfloat16").to(device)
    ppl = perplexity(model, data["val"], args.batch, device)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    target = paths(args)["reference"] / f"{args.name}.json"
    write_json(str(target), {"ppl": ppl, "machine": machine()})
    say(f"{args.name}: held-out ppl {ppl:.2f}")
    write_json(str(target), {"ppl": ppl, "machine": machine(), **(score_tasks(args, args.name, folder) or {})})


def worker_run(args) -> None:
    import torch

    from benchmarks._common import fit_seconds, kd_stage, perplexity

    data, device = _blocks(args), _device()
    target = paths(args)["runs"] / f"{args.name}.json"
    folder = paths(args)["models"] / args.name
    previous = json.loads(target.read_text()) if target.exists() else None
    if previous is not None and (folder / "config.json").exists():  # trained before a cut: only the tasks are left
        result = previous
    else:
        variant, size = parse_kd_variant(args.teacher)
        student = compensated_start(args, data) if args.compensate else None
        L.seed_everything(args.seed, verbose=False)  # the LoRA init (and dropout)
        stage = kd_stage(data["folder"], args.mask, args.lr, variant, size, paths(args)["cache_dir"],
                         weighting=args.weighting, select_fraction=args.select_fraction, student=student)
        fingerprint = Fingerprint()
        seconds = fit_seconds(stage, data["train"], args.batch, args.steps, seed=args.seed, callbacks=[fingerprint])
        ppl = perplexity(stage.model, data["val"], args.batch, device)
        stage.save_pruned_model(str(folder), overwrite=True)
        del stage
        if device == "cuda":
            torch.cuda.empty_cache()
        result = {"teacher": args.teacher, "weighting": args.weighting, "seed": args.seed,
                  "compensate": "linear" if args.compensate else None,
                  "select_fraction": args.select_fraction if args.weighting == "student_selective" else None,
                  "steps": args.steps, "batch": args.batch, "seq": args.seq,
                  "tokens": args.steps * args.batch * args.seq, "ppl": ppl, "train_s": seconds,
                  "fingerprint": fingerprint.values, "machine": machine()}
        write_json(str(target), result)
        say(f"{args.name}: held-out ppl {ppl:.2f}, trained in {seconds:.0f} s")
    write_json(str(target), {**result, **(score_tasks(args, args.name, folder) or {})})


def compensated_start(args, data) -> str:
    """The cut with ReplaceMe-style linear compensation, fitted on the first (unshuffled) training blocks, once."""
    import torch

    from lit_prune.components import compensate as compensation
    from lit_prune.components.checkpoint import save_pruned
    from lit_prune.components.mask_io import load_mask
    from lit_prune.hf import load_causal_lm, load_tokenizer

    folder = paths(args)["models"] / f"compensated_start_{args.compensate_tokens}"
    if not (folder / "config.json").exists():
        artifact = load_mask(args.mask)
        model = load_causal_lm(data["folder"], "float32").to(_device()).eval()
        count = -(-args.compensate_tokens // data["train"].size(1))
        blocks = data["train"][:count].to(_device())
        with torch.no_grad():
            fits = compensation.compensate_linear(model, artifact.drop, blocks.split(4))
        report = compensation.fits_report(fits, calib="first training blocks", calib_tokens=int(blocks.numel()),
                                          ridge=0.0)
        artifact = replace(artifact, extra={**artifact.extra, "compensation": report})
        own = folder.with_name(f"{folder.name}.{os.getpid()}")
        save_pruned(model.to(torch.bfloat16).cpu(), artifact, own, tokenizer=load_tokenizer(data["folder"]),
                    overwrite=True)
        try:
            os.rename(own, folder)
        except OSError:  # another seed's worker was first: same data, same map
            shutil.rmtree(own, ignore_errors=True)
        del model
    return str(folder)


class Fingerprint(L.Callback):
    """Records what a seed must change: the LoRA init (sum of |lora_A|) and the first batch (its second tokens)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def on_train_start(self, trainer, module) -> None:
        lora = [p.detach().float() for n, p in module.named_parameters() if "lora_A" in n]
        self.values["lora_init"] = float(sum(p.abs().sum() for p in lora)) if lora else None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.values["first_batch"] = [int(i) for i in batch["input_ids"][:, 1].tolist()]


# ------------------------------------------------------------------------------------------------ orchestration
def prepare_blocks(args) -> dict[str, Any]:
    """Tokenize once (the workers load the same tensors): training blocks and the held-out tail."""
    import torch

    from benchmarks._common import recovery_blocks

    target = paths(args)["blocks"]
    if not target.exists():
        data = recovery_blocks(args)
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"folder": data["folder"], "train": data["train"].clone(), "val": data["val"].clone()}, target)
    data = torch.load(target, weights_only=True)
    return {"train_blocks": len(data["train"]), "val_blocks": len(data["val"])}


def worker_argv(args, job: dict[str, Any]) -> list[str]:
    shared = ["--model", args.model, "--mask", args.mask, "--seq", str(args.seq), "--batch", str(args.batch),
              "--steps", str(args.steps), "--lr", str(args.lr), "--results-dir", args.results_dir,
              "--work-dir", args.work_dir, "--eval-batch", str(args.eval_batch), "--tasks", *args.tasks,
              "--select-fraction", str(args.select_fraction)]
    if args.limit is not None:
        shared += ["--limit", str(args.limit)]
    if args.data_dir:
        shared += ["--data-dir", args.data_dir]
    argv = [sys.executable, "-m", "benchmarks.recovery_matrix", "--worker", job["kind"], "--name", job["name"]]
    if job["kind"] == "run":
        argv += ["--teacher", job["teacher"], "--weighting", job["weighting"], "--seed", str(job["seed"])]
        if job.get("compensate"):
            argv += ["--compensate", "--compensate-tokens", str(args.compensate_tokens)]
    return argv + shared


def job_done(args, job: dict[str, Any]) -> bool:
    p = paths(args)
    target = {"cache": p["caches"], "reference": p["reference"], "run": p["runs"]}[job["kind"]] / f"{job['name']}.json"
    if not target.exists():
        return False
    if job["kind"] == "cache":
        return (p["cache_dir"] / job["name"] / "meta.json").exists()
    return not args.tasks or "tasks" in json.loads(target.read_text())


# What every stored result depends on: a results or work folder made with other values is refused, not mixed in.
PLAN_KEYS = ("model", "text", "train_text", "mask", "seq", "batch", "steps", "val_blocks", "lr", "max_train_blocks",
             "select_fraction", "tasks", "limit")


def check_plan(args) -> None:
    plan = {k: getattr(args, k) for k in PLAN_KEYS}
    for folder in (Path(args.results_dir), Path(args.work_dir)):
        target = folder / "plan.json"
        if target.exists():
            old = json.loads(target.read_text())
            changed = {k: (old.get(k), v) for k, v in plan.items() if old.get(k) != v}
            if changed:
                words = ", ".join(f"--{k}: {a} there, {b} now" for k, (a, b) in changed.items())
                raise SystemExit(f"{folder} holds results of other settings ({words}); use a new --results-dir / "
                                 "--work-dir, or the same settings to resume.")
        else:
            write_json(str(target), plan)


def orchestrate(args) -> None:
    p = paths(args)
    check_plan(args)
    for key in ("runs", "reference", "caches", "logs"):
        p[key].mkdir(parents=True, exist_ok=True)
    say(f"preparing blocks ({args.model}; mask {args.mask})")
    sizes = prepare_blocks(args)
    runs = plan_runs(args)
    caches = sorted({cache_name(*parse_kd_variant(r["teacher"])) for r in runs} - {None})
    jobs = ([{"kind": "cache", "name": c, "needs": None} for c in caches]
            + [{"kind": "reference", "name": n, "needs": None} for n in ("dense", "pruned")]
            + [{**r, "kind": "run", "needs": cache_name(*parse_kd_variant(r["teacher"]))} for r in runs])
    pending = [j for j in jobs if not job_done(args, j)]
    say(f"{sizes['train_blocks']} training blocks, {sizes['val_blocks']} held-out; {len(runs)} runs of "
        f"{args.steps * args.batch * args.seq:,} tokens; {len(jobs) - len(pending)} of {len(jobs)} jobs already "
        f"done; up to {args.parallel} workers")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // args.parallel)))
    running: dict[str, tuple[subprocess.Popen, dict[str, Any], float, Any]] = {}
    failed: set[str] = set()
    stopped: set[str] = set()
    done_caches = {c for c in caches if job_done(args, {"kind": "cache", "name": c})}
    while pending or running:
        if args.time_limit and time.perf_counter() - START > args.time_limit:
            say(f"--time-limit {args.time_limit:.0f} s reached: stopping {sorted(running)}, not starting "
                f"{[j['name'] for j in pending]} (a later call resumes them)")
            for proc, _, _, log in running.values():
                proc.terminate()  # a run keeps its perplexity JSON if it was written before its tasks
                proc.wait()
                log.close()
            stopped = set(running)
            break
        for name, (proc, job, started, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode == 0:
                if job["kind"] == "cache":
                    done_caches.add(name)
                say(f"done {name} ({time.perf_counter() - started:.0f} s){_summary(args, job)}")
            else:
                failed.add(name)
                tail = (p["logs"] / f"{name}.log").read_text(errors="replace").strip().splitlines()[-6:]
                say(f"FAILED {name} (exit {proc.returncode}); log {p['logs'] / (name + '.log')}:\n    "
                    + "\n    ".join(tail))
        for job in list(pending):
            if len(running) >= args.parallel:
                break
            if job["needs"] in failed:
                pending.remove(job)
                failed.add(job["name"])
                say(f"skip {job['name']}: its cache {job['needs']} failed")
                continue
            if job["needs"] is not None and job["needs"] not in done_caches:
                continue
            pending.remove(job)
            log = open(p["logs"] / f"{job['name']}.log", "w")  # noqa: SIM115 (closed when the worker ends)
            proc = subprocess.Popen(worker_argv(args, job), stdout=log, stderr=subprocess.STDOUT, env=env)
            running[job["name"]] = (proc, job, time.perf_counter(), log)
            say(f"start {job['name']} (pid {proc.pid}; {len(running)} running, {len(pending)} waiting)")
        time.sleep(0.5)
    say("all jobs ended" + (f"; failed: {sorted(failed)}" if failed else "")
        + (f"; stopped: {sorted(stopped)}" if stopped else ""))


def _summary(args, job: dict[str, Any]) -> str:
    folder = {"cache": "caches", "reference": "reference", "run": "runs"}[job["kind"]]
    target = paths(args)[folder] / f"{job['name']}.json"
    if not target.exists():
        return ""
    data = json.loads(target.read_text())
    words = []
    if data.get("ppl") is not None:
        words.append(f"ppl {data['ppl']:.2f}")
    if (data.get("average") or {}).get("value") is not None:
        words.append(f"task avg {data['average']['value']:.3f}")
    if data.get("bytes_per_token") is not None:
        words.append(f"{data['bytes_per_token']:.2f} B/token")
    return ": " + ", ".join(words) if words else ""


# ------------------------------------------------------------------------------------------------ aggregation
def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, std


def _seed_mean_rows(runs: list[dict[str, Any]], task: str) -> dict[str, list] | None:
    """Per-row metric averaged over a variant's seeds (rows matched by doc_id), for paired differences."""
    tables = [r["tasks"][task] for r in runs if task in (r.get("tasks") or {}) and r["tasks"][task].get("rows")]
    if len(tables) != len(runs) or not tables:
        return None
    ids = tables[0]["doc_id"]
    if any(t["doc_id"] != ids for t in tables):
        return None
    return {"doc_id": ids, "acc": [sum(t["rows"][i] for t in tables) / len(tables) for i in range(len(ids))]}


def aggregate(args) -> dict[str, Any]:
    from lit_prune.evaluate_models import paired_difference

    p = paths(args)
    reference = {n: json.loads((p["reference"] / f"{n}.json").read_text())
                 for n in ("dense", "pruned") if (p["reference"] / f"{n}.json").exists()}
    caches = {f.stem: json.loads(f.read_text()) for f in sorted(p["caches"].glob("*.json"))}
    runs = [json.loads(f.read_text()) for f in sorted(p["runs"].glob("*.json"))]
    dense_ppl = reference.get("dense", {}).get("ppl")
    pruned_ppl = reference.get("pruned", {}).get("ppl")
    gap = (pruned_ppl - dense_ppl) if dense_ppl is not None and pruned_ppl is not None else None
    by_config: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_config.setdefault(config_name(run), []).append(run)
    ref_runs = by_config.get(REFERENCE, [])
    tasks = list(args.tasks)
    rows_ref = {t: _seed_mean_rows(ref_runs, t) for t in tasks} if ref_runs else {}
    variants: dict[str, Any] = {}
    for config, members in by_config.items():
        members.sort(key=lambda r: r["seed"])
        ppl, ppl_std = _mean_std([r["ppl"] for r in members])
        closed = [(pruned_ppl - r["ppl"]) / gap for r in members] if gap else []
        closed_mean, closed_std = _mean_std(closed)
        averages = [(r.get("average") or {}) for r in members]
        acc, acc_std = _mean_std([a.get("value") for a in averages])
        row_se = _mean_std([a.get("stderr") for a in averages])[0]
        train_s = _mean_std([r.get("train_s") for r in members])[0]
        name = cache_name(*parse_kd_variant(members[0]["teacher"]))
        fingerprints = [r.get("fingerprint") or {} for r in members]
        entry = {
            "teacher": members[0]["teacher"], "weighting": members[0]["weighting"],
            "seeds": [r["seed"] for r in members], "tokens": members[0].get("tokens"),
            "ppl": ppl, "ppl_std": ppl_std, "ppl_per_seed": [r["ppl"] for r in members],
            "gap_closed": closed_mean, "gap_closed_std": closed_std,
            "task_avg": acc, "task_avg_std": acc_std, "task_avg_row_se": row_se,
            "tasks": {t: _mean_std([(r.get("tasks") or {}).get(t, {}).get("value") for r in members])[0]
                      for t in tasks},
            "bytes_per_token": caches.get(name, {}).get("bytes_per_token") if name else None,
            "train_s": train_s,
            "seeds_change_lora_init": len({f.get("lora_init") for f in fingerprints}) == len(members),
            "seeds_change_batch_order": len({tuple(f.get("first_batch") or ()) for f in fingerprints})
            == len(members),
        }
        if config != REFERENCE and rows_ref:
            diffs = [paired_difference(_seed_mean_rows(members, t) or {}, rows_ref[t] or {}, "acc") for t in tasks]
            if diffs and all(d is not None for d in diffs):
                errors = [d["stderr"] for d in diffs]
                entry["task_avg_vs_online"] = {
                    "diff": sum(d["diff"] for d in diffs) / len(diffs),
                    "stderr": math.sqrt(sum(e * e for e in errors)) / len(errors) if None not in errors else None}
        variants[config] = entry
    online = variants.get(REFERENCE, {}).get("gap_closed")
    for entry in variants.values():
        entry["share_of_online"] = entry["gap_closed"] / online if online and entry["gap_closed"] is not None \
            else None
    summary = {"machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "worker"},
               "dense": _reference_entry(reference.get("dense")), "pruned": _reference_entry(reference.get("pruned")),
               "caches": caches, "variants": variants}
    markdown = summary_markdown(summary)
    write_json(str(p["results"] / "summary.json"), summary)
    (p["results"] / "summary.md").write_text(markdown + "\n")
    if args.out:
        write_json(args.out, summary)
        Path(args.out).with_suffix(".md").write_text(markdown + "\n")
    print(markdown)
    return summary


def _reference_entry(data: dict[str, Any] | None) -> dict[str, Any] | None:
    if data is None:
        return None
    average = data.get("average") or {}
    return {"ppl": data.get("ppl"), "task_avg": average.get("value"), "task_avg_row_se": average.get("stderr"),
            "tasks": {t: r.get("value") for t, r in (data.get("tasks") or {}).items()}}


def _pm(mean: float | None, std: float | None, fmt: str, scale: float = 1.0) -> str:
    if mean is None:
        return ""
    text = format(mean * scale, fmt)
    return text + (f" ± {format(std * scale, fmt.lstrip('+'))}" if std is not None else "")


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = ["| variant | seeds | held-out ppl | gap closed | share of online's gap | task avg % (row SE) | "
             "vs online KD, paired (pp) | bytes/token | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ("dense", "pruned"):
        entry = summary[name]
        if entry:
            acc = "" if entry["task_avg"] is None else _pm(entry["task_avg"], None, ".1f", 100)
            se = f" ({entry['task_avg_row_se'] * 100:.1f})" if entry.get("task_avg_row_se") is not None else ""
            lines.append(f"| {name} | | {entry['ppl']:.2f} | {'0%' if name == 'pruned' else ''} | | {acc}{se} | | "
                         "| |")
    for config, v in summary["variants"].items():
        se = f" ({v['task_avg_row_se'] * 100:.1f})" if v.get("task_avg_row_se") is not None else ""
        paired = v.get("task_avg_vs_online")
        paired_text = "" if not paired else _pm(paired["diff"], paired["stderr"], "+.1f", 100)
        size = f"{v['bytes_per_token']:.2f}" if v["bytes_per_token"] else "full"
        share = "" if v["share_of_online"] is None else f"{v['share_of_online']:.0%}"
        lines.append(
            f"| {config} | {len(v['seeds'])} | {_pm(v['ppl'], v['ppl_std'], '.2f')} | "
            f"{_pm(v['gap_closed'], v['gap_closed_std'], '.1f', 100)}{'%' if v['gap_closed'] is not None else ''} | "
            f"{share} | "
            f"{_pm(v['task_avg'], v['task_avg_std'], '.1f', 100)}{se} | {paired_text} | {size} | "
            f"{_pm(v['train_s'], None, '.0f')} |")
    checks = [c for c, v in summary["variants"].items() if len(v["seeds"]) > 1
              and not (v["seeds_change_lora_init"] and v["seeds_change_batch_order"])]
    lines.append("")
    lines.append(f"machine: {summary['machine']}. ± is the standard deviation over seeds; row SE is one run's "
                 "sampling error of the task average over the scored rows; paired = seed-averaged accuracy minus "
                 f"{REFERENCE}'s on the same rows ± its standard error.")
    if checks:
        lines.append(f"WARNING: seeds did not change the LoRA init or the batch order for {checks}.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_recovery_arguments(parser)
    parser.add_argument("--max-train-blocks", type=int, default=None, help="Cap on training blocks (smoke runs).")
    parser.add_argument("--teachers", nargs="*", default=["online", "tail_15", "renormalized_10", "sampled_12"],
                        help=f"Teacher forms at weighting none: {KD_VARIANT_FORMS}.")
    parser.add_argument("--teacher-seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--weightings", nargs="*", default=list(WEIGHTINGS),
                        help="Weightings of the online teacher.")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--compensated-seeds", nargs="*", type=int, default=[],
                        help="Seeds of online KD (weighting none) from the linearly compensated cut.")
    parser.add_argument("--compensate-tokens", type=int, default=16384,
                        help="Calibration tokens of the compensation: the first training blocks.")
    parser.add_argument("--select-fraction", type=float, default=0.2, help="student_selective's share of tokens.")
    parser.add_argument("--tasks", nargs="*", default=list(OFFLINE_TASKS), help="Benchmark tasks (none: skip).")
    parser.add_argument("--limit", type=int, default=300, help="Rows per task (the first N).")
    parser.add_argument("--eval-batch", type=int, default=32, help="lm-eval batch size.")
    parser.add_argument("--data-dir", default=None, help="Folder of the offline tasks (default: the lit_prune cache).")
    parser.add_argument("--parallel", type=int, default=8, help="Worker processes at a time (one GPU).")
    parser.add_argument("--results-dir", default="results/recovery_matrix", help="Per-job JSON, logs, summary.")
    parser.add_argument("--work-dir", default=None, help="Blocks, caches, saved models (large; default: a new "
                        "temporary folder, so pass one to resume).")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="Seconds after which running workers are stopped and the table is written from what is "
                        "done (the call's own limit minus a margin).")
    parser.add_argument("--out", default=None, help="Also write the summary JSON here (and .md beside it).")
    parser.add_argument("--aggregate-only", action="store_true", help="Only print the table of --results-dir.")
    worker = parser.add_argument_group("worker (internal)")
    worker.add_argument("--worker", choices=["cache", "reference", "run"], default=None, help=argparse.SUPPRESS)
    worker.add_argument("--name", default=None, help=argparse.SUPPRESS)
    worker.add_argument("--teacher", default=None, help=argparse.SUPPRESS)
    worker.add_argument("--weighting", default=None, help=argparse.SUPPRESS)
    worker.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    worker.add_argument("--compensate", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        {"cache": worker_cache, "reference": worker_reference, "run": worker_run}[args.worker](args)
        return
    check_args(args)
    if args.aggregate_only:
        aggregate(args)
        return
    if args.work_dir is None:
        args.work_dir = tempfile.mkdtemp(prefix="recovery_matrix_")
    orchestrate(args)
    aggregate(args)


if __name__ == "__main__":
    main()
