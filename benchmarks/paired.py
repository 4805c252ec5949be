"""Paired accuracy difference of two `lit_prune evaluate` runs that scored the same rows in separate `--out` folders.

    python -m benchmarks.paired e3=runs/eval_e3 kl_importance=runs/eval_kl        # first minus second

Running one model per process lets two evaluations run side by side (or on different days) without the dense model
that ``benchmarks/quality.py`` always adds; the difference is then taken per row (``doc_id``) from the folders'
per-row files with the same code as ``evaluate``'s own paired column. Both runs must have used the same ``--limit``
and tasks (rows are matched by id; a task missing from either run is left out and named).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lit_prune.evaluate_models import load_rows, paired_versus


def _named(value: str) -> tuple[str, Path]:
    name, sep, folder = value.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=EVALUATE_OUT_DIR, got {value!r}")
    return name, Path(folder)


def _load(name: str, folder: Path) -> dict:
    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"{folder}: no results.json; pass the --out folder of a `lit_prune evaluate` run.")
    models = json.loads(path.read_text())["models"]
    if name not in models:
        raise SystemExit(f"{folder} holds models {sorted(models)}, not {name!r}; use NAME as in its --models.")
    return models[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", type=_named, help="NAME=DIR: the model whose accuracy the difference starts from")
    parser.add_argument("b", type=_named, help="NAME=DIR: the model subtracted")
    parser.add_argument("--out", default=None, help="Write the differences as JSON here.")
    args = parser.parse_args()
    (name_a, dir_a), (name_b, dir_b) = args.a, args.b
    result_a, result_b = _load(name_a, dir_a), _load(name_b, dir_b)
    tasks = [t for t in result_a["tasks"] if t in result_b["tasks"]]
    left_out = sorted(set(result_a["tasks"]) ^ set(result_b["tasks"]))
    rows_a = {t: load_rows(dir_a, name_a, t) for t in tasks}
    rows_b = {t: load_rows(dir_b, name_b, t) for t in tasks}
    missing = [t for t in tasks if rows_a[t] is None or rows_b[t] is None]
    if missing:
        raise SystemExit(f"no per-row files for {missing} (rows/<name>/<task>.json); rerun those tasks.")
    paired = paired_versus(rows_b, rows_a, {t: result_a["tasks"][t] for t in tasks})
    print(f"| task | rows | {name_a} | {name_b} | {name_a} - {name_b} (paired) |")
    print("|---|---|---|---|---|")
    for task in tasks:
        d = paired["tasks"][task]
        print(f"| {task} | {d['n']} | {result_a['tasks'][task]['value'] * 100:.1f} | "
              f"{result_b['tasks'][task]['value'] * 100:.1f} | {d['diff'] * 100:+.2f} ± {d['stderr'] * 100:.2f} |")
    avg = paired["average"]
    if avg is not None:
        mean_a = sum(result_a["tasks"][t]["value"] for t in tasks) / len(tasks) * 100
        mean_b = sum(result_b["tasks"][t]["value"] for t in tasks) / len(tasks) * 100
        print(f"| average | - | {mean_a:.2f} | {mean_b:.2f} | {avg['diff'] * 100:+.2f} ± {avg['stderr'] * 100:.2f} |")
    if left_out:
        print(f"left out (scored by one run only): {left_out}")
    if args.out:
        Path(args.out).write_text(json.dumps({"a": [name_a, str(dir_a)], "b": [name_b, str(dir_b)],
                                              "left_out": left_out, **paired}, indent=1))


if __name__ == "__main__":
    main()
