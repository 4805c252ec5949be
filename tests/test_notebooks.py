"""The notebooks run top to bottom, their parameter cell overridden to tiny, offline inputs.

Code cells are executed with plain ``exec`` in one namespace (no Jupyter kernel needed). ``IPython.display`` is
replaced by a recorder, so the tests also see which images the notebooks show.
"""

import math
import sys
import types
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"


@pytest.fixture()
def shown(monkeypatch) -> list[Path]:
    """Paths of the images the notebook displays (a stand-in for ``IPython.display``)."""
    images: list[Path] = []

    class Image:
        def __init__(self, filename: str) -> None:
            self.filename = Path(filename)

    def display(obj) -> None:
        images.append(obj.filename)

    # Only the submodule: `from IPython.display import ...` finds it in sys.modules without importing `IPython`,
    # while libraries that look for a running IPython (matplotlib, tqdm) still see none.
    ipython_display = types.ModuleType("IPython.display")
    ipython_display.Image, ipython_display.display = Image, display
    monkeypatch.setitem(sys.modules, "IPython.display", ipython_display)
    return images


def run_notebook(name: str, overrides: dict) -> dict:
    """Execute every code cell of ``notebooks/<name>`` in one namespace; ``overrides`` follow the parameters cell."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    params = [i for i, cell in enumerate(code) if "parameters" in cell.metadata.get("tags", [])]
    assert len(params) == 1, f"{name} needs exactly one code cell tagged 'parameters'"
    namespace: dict = {"__name__": "__main__"}
    for i, cell in enumerate(code):
        assert not cell.get("outputs"), f"{name} cell {i} has stored outputs; clear them before committing"
        exec(compile(cell.source, f"{name}[{i}]", "exec"), namespace)
        if i == params[0]:
            unknown = sorted(set(overrides) - set(namespace))
            assert not unknown, f"{name}: the parameters cell no longer defines {unknown}"
            namespace.update(overrides)
    return namespace


def test_inspect_mask_falls_back_to_a_tiny_run_then_reads_it(tmp_path, shown, capsys):
    out = tmp_path / "png"
    first = run_notebook("inspect_mask.ipynb", {
        "RUN_DIR": str(tmp_path / "no_such_run"), "WORK_DIR": str(tmp_path / "work"), "OUT_DIR": str(out),
    })
    run_dir = first["run_dir"]
    assert run_dir.parent.parent == tmp_path / "work" / "runs", "the fallback run lives in WORK_DIR"
    assert first["mask"].num_layers == 6 and len(first["mask"].drop) == 2
    assert first["steps"] == [0, 1, 2, 3, 4], "MaskMonitor logged at every one of the 4 steps"
    assert shown == [out / "gate_trajectory.png"] and shown[0].stat().st_size > 1000
    printed = capsys.readouterr().out
    assert first["mask"].describe() in printed
    assert "train/loss" in printed and "mask/num_dropped" in printed

    # An existing run folder is read as it is: no new run.
    second = run_notebook("inspect_mask.ipynb", {"RUN_DIR": str(run_dir), "OUT_DIR": str(tmp_path / "again")})
    assert second["run_dir"] == run_dir
    assert second["mask"] == first["mask"]
    assert "cli" not in second
    assert shown[-1] == tmp_path / "again" / "gate_trajectory.png" and shown[-1].is_file()


def test_walkthrough_runs_every_stage_on_the_tiny_model(tiny_checkpoint, tiny_text, tmp_path, shown, capsys):
    ns = run_notebook("walkthrough.ipynb", {
        "STEPS": 2, "MODEL": str(tiny_checkpoint), "TEXT": str(tiny_text), "MAX_LENGTH": 32, "OUT": str(tmp_path),
        "PROMPT": "The exact date",
    })
    for key in ("dense_ppl", "pruned_ppl", "recovered_ppl"):
        assert math.isfinite(ns[key]) and ns[key] > 1, f"{key}={ns[key]}"
    assert ns["pruned_ppl"] != ns["dense_ppl"], "the pruned model is a different model"
    assert ns["mask_path"].is_file() and ns["mask_path"].parent.parent.parent == tmp_path
    assert ns["pruned_model"].config.num_hidden_layers == 6 - len(ns["mask"].drop) == 4
    prompt_tokens = len(ns["tokenizer"]("The exact date")["input_ids"])
    assert prompt_tokens < ns["tokens"].shape[1] <= prompt_tokens + 20, "greedy continuation of the prompt"
    assert math.isfinite(ns["speedup"]) and ns["speedup"] > 0
    assert shown == [tmp_path / "gate_trajectory.png", tmp_path / "retention_speedup.png"]
    assert all(png.stat().st_size > 1000 for png in shown)
    printed = capsys.readouterr().out
    assert "dense perplexity" in printed and "layers:" in printed and "ms" in printed
