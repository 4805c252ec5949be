"""Report figures from run folders: a 4-step CLP search and a block-influence baseline on the tiny checkpoint."""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from lit_prune.cli import main as cli_main
from lit_prune.components.mask_io import MaskArtifact, load_mask, save_mask
from lit_prune.reports import (
    ReportError,
    gate_history,
    gate_trajectory_png,
    importance_png,
    main,
    read_scalars,
    retention_speedup_png,
    speedup_png,
)

ROOT = Path(__file__).parents[1]
STEPS = 4
LAYERS = 6
RED = (0xD6 / 255, 0x27 / 255, 0x28 / 255)  # lit_prune.reports.DROPPED_COLOR


def _tiny_args(tiny_checkpoint: Path, tiny_text: Path, save_dir: Path) -> list[str]:
    return [
        f"--model.init_args.pretrained={tiny_checkpoint}",
        "--model.init_args.dtype=float32",
        "--model.init_args.ratio=null",
        "--model.init_args.num_drop=2",
        f"--data.text_files=[{tiny_text}]",
        "--data.max_length=32",
        "--trainer.accelerator=cpu",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={save_dir}",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.logger.init_args.version=tiny",
    ]


@pytest.fixture(scope="module")
def search_run(tiny_checkpoint, tiny_text, tmp_path_factory) -> Path:
    """A 4-step CLP search, gate scalars logged at every step (0 = before training, then 1..4)."""
    callbacks = [
        {"class_path": "lit_prune.callbacks.TemperatureSchedule", "init_args": {"start": 1.0, "end": 0.05}},
        {"class_path": "lit_prune.callbacks.MaskMonitor", "init_args": {"every_n_steps": 1}},
        {"class_path": "lit_prune.callbacks.ModelExport", "init_args": {"what": "mask"}},
    ]
    save_dir = tmp_path_factory.mktemp("search")
    cli = cli_main(["fit", "-c", str(ROOT / "configs/clp_smollm2.yaml"), *_tiny_args(tiny_checkpoint, tiny_text,
                    save_dir), f"--trainer.max_steps={STEPS}", "--trainer.log_every_n_steps=1",
                    f"--trainer.callbacks={json.dumps(callbacks)}"])
    return Path(cli.trainer.log_dir)


@pytest.fixture(scope="module")
def baseline_run(tiny_checkpoint, tiny_text, tmp_path_factory) -> Path:
    """A block-influence baseline: its mask.json has per-layer scores, its events have no gate scalars."""
    save_dir = tmp_path_factory.mktemp("baseline")
    cli = cli_main(["fit", "-c", str(ROOT / "configs/baseline_block_influence_smollm2.yaml"),
                    *_tiny_args(tiny_checkpoint, tiny_text, save_dir), "--model.init_args.calibration_batches=2"])
    return Path(cli.trainer.log_dir)


def _red_pixels(png: Path) -> int:
    from matplotlib.image import imread

    image = imread(png)[..., :3]
    close = (abs(image[..., 0] - RED[0]) < 0.04) & (abs(image[..., 1] - RED[1]) < 0.04) & (
        abs(image[..., 2] - RED[2]) < 0.04
    )
    return int(close.sum())


def _png_size(png: Path) -> tuple[int, int]:
    from matplotlib.image import imread

    height, width = imread(png).shape[:2]
    return width, height


# ------------------------------------------------------------------------------------------------------- read_scalars


def test_read_scalars_has_every_gate_at_every_step(search_run):
    scalars = read_scalars(search_run)
    gate_tags = {f"mask/gate/layer_{i:02d}" for i in range(LAYERS)}
    assert gate_tags | {"mask/num_dropped", "train/loss"} <= set(scalars)
    for tag in gate_tags:
        assert [step for step, _ in scalars[tag]] == list(range(STEPS + 1))
        assert all(0.0 <= value <= 1.0 for _, value in scalars[tag])
    assert [value for _, value in scalars["mask/num_dropped"]] == [2.0] * (STEPS + 1)
    assert all(math.isfinite(value) for _, value in scalars["train/loss"])

    # The final mask drops the layers whose gates are most closed at the last step.
    drop = load_mask(search_run / "mask.json").drop
    last = {i: scalars[f"mask/gate/layer_{i:02d}"][-1][1] for i in range(LAYERS)}
    assert max(last[i] for i in drop) < min(last[i] for i in range(LAYERS) if i not in drop)


def test_read_scalars_orders_event_files_by_time_and_later_steps_win(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    # A resumed run: the second file re-logs step 2. As text the names sort the wrong way ("1000" < "999").
    run = tmp_path / "run"
    run.mkdir()
    for stamp, points in (("999", [(0, 0.0), (1, 1.0), (2, 2.0)]), ("1000", [(2, 20.0), (3, 30.0)])):
        scratch = tmp_path / f"scratch_{stamp}"
        with SummaryWriter(scratch) as writer:
            for step, value in points:
                writer.add_scalar("train/loss", value, step)
        (source,) = scratch.glob("events.out.tfevents.*")
        shutil.move(source, run / f"events.out.tfevents.{stamp}.host.1.0")
    assert read_scalars(run)["train/loss"] == [(0, 0.0), (1, 1.0), (2, 20.0), (3, 30.0)]


def test_read_scalars_explains_folders_without_events(search_run, tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        read_scalars(tmp_path / "missing")
    with pytest.raises(ReportError, match=r"No TensorBoard event files .*TensorBoardLogger"):
        read_scalars(tmp_path)
    # One level too high: the message names the version folder to pass instead.
    with pytest.raises(ReportError, match=f"sub-folders; pass one of them: {search_run}"):
        read_scalars(search_run.parent)


# ------------------------------------------------------------------------------------------------------ gate figures


def test_gate_history_is_layers_by_steps(search_run):
    steps, values = gate_history(read_scalars(search_run))
    assert steps == list(range(STEPS + 1))
    assert len(values) == LAYERS and all(len(row) == len(steps) for row in values)
    assert not any(math.isnan(v) for row in values for v in row)
    with pytest.raises(ReportError, match="no `other/gate/layer_XX` scalars"):
        gate_history(read_scalars(search_run), scope="other")


def test_gate_trajectory_marks_the_dropped_layers_of_mask_json(search_run, tmp_path):
    marked = gate_trajectory_png(search_run, tmp_path / "marked.png")
    assert marked.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _red_pixels(marked) > 100, "drop strip and red layer labels"

    unmarked_run = tmp_path / "no_mask"
    unmarked_run.mkdir()
    for path in search_run.glob("events.out.tfevents.*"):
        shutil.copy(path, unmarked_run)
    unmarked = gate_trajectory_png(unmarked_run, tmp_path / "unmarked.png")
    assert _red_pixels(unmarked) == 0

    wrong = MaskArtifact(model="other", num_layers=LAYERS + 2, drop=[1])
    with pytest.raises(ReportError, match="8 layers .* gates for 6"):
        gate_trajectory_png(search_run, tmp_path / "wrong.png", mask=wrong)


def test_gate_trajectory_needs_gate_scalars(baseline_run, tmp_path):
    with pytest.raises(ReportError, match="no `mask/gate/layer_XX` scalars .*MaskMonitor"):
        gate_trajectory_png(baseline_run, tmp_path / "gates.png")
    assert not (tmp_path / "gates.png").exists()


# ------------------------------------------------------------------------------------------------ importance, points


def test_importance_png_puts_methods_side_by_side(baseline_run, tiny_checkpoint, tmp_path):
    bi = load_mask(baseline_run / "mask.json")
    assert bi.scores is not None and len(bi.scores) == LAYERS
    manual = save_mask(tmp_path / "manual.json", MaskArtifact(
        model=str(tiny_checkpoint), num_layers=LAYERS, drop=[3], method="manual", scores=[5, 4, 3, -1, 2, 1]))
    one = importance_png({"bi": baseline_run / "mask.json"}, tmp_path / "one.png")
    two = importance_png({"bi": baseline_run / "mask.json", "manual": manual}, tmp_path / "two.png")
    assert _png_size(two)[0] > _png_size(one)[0] + 150, "one panel per method"
    assert _red_pixels(one) > 0, "dropped layers are red bars"


def test_importance_png_explains_bad_masks(search_run, baseline_run, tmp_path):
    with pytest.raises(ReportError, match="'clp' .*no per-layer `scores`"):
        importance_png({"bi": baseline_run / "mask.json", "clp": search_run / "mask.json"}, tmp_path / "x.png")
    other = MaskArtifact(model="m", num_layers=LAYERS + 1, drop=[1], scores=[0.0] * (LAYERS + 1))
    with pytest.raises(ReportError, match="different layer counts"):
        importance_png({"bi": baseline_run / "mask.json", "other": other}, tmp_path / "x.png")
    with pytest.raises(ReportError, match="at least one mask"):
        importance_png({}, tmp_path / "x.png")
    with pytest.raises(ReportError, match="'missing'.*does not exist"):
        importance_png({"missing": tmp_path / "nope.json"}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_retention_speedup_png_checks_points(tmp_path):
    points = [{"name": "dense", "retention": 1.0, "speedup": 1.0}, {"name": "clp", "retention": 0.7, "speedup": 1.3}]
    png = retention_speedup_png(points, tmp_path / "rs.png")
    assert png.is_file() and _png_size(png)[0] > 300
    with pytest.raises(ReportError, match=r"lacks \['speedup'\]"):
        retention_speedup_png([{"name": "a", "retention": 1.0}], tmp_path / "bad.png")
    with pytest.raises(ReportError, match="finite"):
        retention_speedup_png([{"name": "a", "retention": float("nan"), "speedup": 1.0}], tmp_path / "bad.png")
    with pytest.raises(ReportError, match="at least one point"):
        retention_speedup_png([], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


# ------------------------------------------------------------------------------------------------------ command line


def test_cli_writes_every_requested_png(search_run, baseline_run, tmp_path):
    points = tmp_path / "points.json"
    points.write_text(json.dumps([{"name": "clp", "retention": 0.8, "speedup": 1.2}]))
    out = tmp_path / "out"
    written = main([str(search_run), "--masks", f"bi={baseline_run / 'mask.json'}", "--points", str(points),
                    "--out", str(out)])
    assert [p.name for p in written] == ["gate_trajectory.png", "importance.png", "retention_speedup.png"]
    assert all(p.parent == out and p.stat().st_size > 1000 for p in written)
    assert [p.name for p in main([str(search_run), "--out", str(tmp_path / "gates_only")])] == ["gate_trajectory.png"]


def test_cli_errors_are_one_line_messages(search_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m lit_prune.reports", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert str(exit_info.value.code).startswith("error: No TensorBoard event files")

    monkeypatch.setattr(sys, "argv", ["reports", str(search_run), "--masks", "bi", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        main()
    assert "expected NAME=PATH" in capsys.readouterr().err

    with pytest.raises(ReportError, match="unique"):
        main([str(search_run), "--masks", "a=x.json", "a=y.json", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_speedup_png_draws_measured_next_to_ideal_and_checks_rows(tmp_path):
    rows = [{"label": "llama2-7b 25% prefill_1x2048", "speedup": 1.314, "ideal": 1.325},
            {"label": "llama2-7b 25% decode_b1", "speedup": 1.2, "ideal": 1.325}]
    png = speedup_png(rows, tmp_path / "speed.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ReportError, match="lacks \\['ideal'\\]"):
        speedup_png([{"label": "x", "speedup": 1.2}], tmp_path / "bad.png")
    with pytest.raises(ReportError, match="finite and > 0"):
        speedup_png([{"label": "x", "speedup": 0.0, "ideal": 1.2}], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
