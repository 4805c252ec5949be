"""Report figures from finished runs: gate trajectories, per-layer importance, and retention vs speed-up.

Pure functions over what runs leave on disk (TensorBoard event files and ``mask.json``); nothing is trained or loaded.
matplotlib (a core dependency) is imported inside the plotting functions, so importing this module stays cheap, and
figures are drawn on a ``matplotlib.figure.Figure`` without pyplot, so no GUI backend or global state is involved::

    run_dir/events.out.tfevents.*  --read_scalars-->  {"mask/gate/layer_00": [(step, value), ...], ...}
                                   --gate_trajectory_png-->  layers x steps heat map (+ mask.json's dropped layers)
    {"bi": mask.json, ...}         --importance_png-->       per-layer scores of each method, dropped layers in red
    [{"name", "retention", "speedup"}, ...] --retention_speedup_png-->  quality kept vs speed gained

Command line (each figure is written when its input is given)::

    python -m lit_prune.reports runs/search/clp_smollm2/version_0 --out reports/ \
        --masks bi=runs/baselines/block_influence_smollm2/version_0/mask.json \
                kl=runs/baselines/kl_importance_smollm2/version_0/mask.json \
        --points points.json        # [{"name": "clp", "retention": 0.8, "speedup": 1.3}, ...]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lit_prune.components.mask_io import MaskArtifact, MaskError, load_mask

if TYPE_CHECKING:
    from matplotlib.figure import Figure

EVENT_GLOB = "events.out.tfevents.*"
DROPPED_COLOR = "#d62728"  # red: the only red in every figure, so dropped layers stand out
KEPT_COLOR = "#1f77b4"
STRIP_KEPT_COLOR = "#d9d9d9"


class ReportError(ValueError):
    """A run folder, mask or point list cannot be turned into the requested figure."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------------------------------


def event_files(run_dir: str | Path) -> list[Path]:
    """TensorBoard event files directly inside ``run_dir``, oldest first (a resumed run has several)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"Run folder {str(run_dir)!r} does not exist. Pass a TensorBoard log folder of a run.")
    files = sorted(run_dir.glob(EVENT_GLOB), key=_event_file_order)
    if files:
        return files
    nested = sorted({str(p.parent) for p in run_dir.rglob(EVENT_GLOB)})
    hint = (
        f" Event files are in sub-folders; pass one of them: {', '.join(nested[:5])}"
        + (f" (and {len(nested) - 5} more)" if len(nested) > 5 else "")
        + "."
        if nested
        else " Was the run logged with a TensorBoardLogger (trainer.logger), and is this its version folder?"
    )
    raise ReportError(f"No TensorBoard event files ({EVENT_GLOB}) in {str(run_dir)!r}.{hint}")


def _event_file_order(path: Path) -> tuple[int, str]:
    # events.out.tfevents.<unix time>.<host>.<pid>.<n>: order by the time, then by name.
    match = re.match(r"events\.out\.tfevents\.(\d+)", path.name)
    return (int(match.group(1)) if match else 0, path.name)


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a run logged, per tag, as ``(step, value)`` pairs sorted by step.

    All event files of the folder are read, oldest first; where a step was logged twice (a resumed run re-logs the
    steps after its checkpoint), the later value wins.

    Args:
        run_dir: A TensorBoard version folder, e.g. ``runs/search/clp_smollm2/version_0``.

    Returns:
        ``{tag: [(step, value), ...]}``, tags sorted by name.

    Raises:
        ReportError: The folder does not exist or holds no event files.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    merged: dict[str, dict[int, float]] = {}
    for path in event_files(run_dir):
        events = EventAccumulator(str(path), size_guidance={SCALARS: 0})  # 0 = keep every point, no sampling
        events.Reload()
        for tag in events.Tags()[SCALARS]:
            by_step = merged.setdefault(tag, {})
            for event in events.Scalars(tag):
                by_step[int(event.step)] = float(event.value)
    return {tag: sorted(merged[tag].items()) for tag in sorted(merged)}


def gate_history(
    scalars: Mapping[str, Sequence[tuple[int, float]]], scope: str = "mask"
) -> tuple[list[int], list[list[float]]]:
    """Arrange ``<scope>/gate/layer_XX`` scalars (written by ``MaskMonitor``) as a layers x steps table.

    Args:
        scalars: Output of :func:`read_scalars`.
        scope: The ``MaskMonitor(scope=...)`` of the run.

    Returns:
        ``(steps, values)``: the sorted logged steps, and ``values[layer][i]`` at ``steps[i]`` (``nan`` where that
        layer has no value at that step; rows for layers never logged are all ``nan``).

    Raises:
        ReportError: The run logged no gate scalars under ``scope``.
    """
    pattern = re.compile(rf"^{re.escape(scope)}/gate/layer_(\d+)$")
    layers = {int(m.group(1)): tag for tag in scalars if (m := pattern.match(tag))}
    if not layers:
        found = sorted({f"{tag.rsplit('/', 1)[0]}/*" if "/" in tag else tag for tag in scalars})
        raise ReportError(
            f"The run logged no `{scope}/gate/layer_XX` scalars (found: {', '.join(found) or 'no scalars'}). "
            "Gate trajectories need a mask search run with the MaskMonitor callback (or pass its `scope`)."
        )
    steps = sorted({step for tag in layers.values() for step, _ in scalars[tag]})
    column = {step: i for i, step in enumerate(steps)}
    values = [[math.nan] * len(steps) for _ in range(max(layers) + 1)]
    for layer, tag in layers.items():
        for step, value in scalars[tag]:
            values[layer][column[step]] = float(value)
    return steps, values


def _load(mask: str | Path | MaskArtifact, name: str = "mask") -> MaskArtifact:
    if isinstance(mask, MaskArtifact):
        return mask
    try:
        return load_mask(mask)
    except MaskError as err:
        raise ReportError(f"{name}: {err}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "lit_prune.reports draws with matplotlib, a dependency of lit_prune that is missing here: "
            "pip install 'matplotlib>=3.7' (or reinstall lit_prune)."
        ) from None
    return Figure(figsize=(width, height), layout="constrained", dpi=100)


def _save(fig: Figure, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png


def _layer_ticks(
    ax: Any, num_layers: int, dropped: Sequence[int], step: int | None = None, fontsize: float = 7
) -> None:
    if step is None:
        step = 1 if num_layers <= 40 else 5  # 70B-class models have 80 layers: label every 5th
    # Every `step`-th layer; when rows are thin, also the first and last dropped layer of each run, so the red
    # labels name the cut, and no regular label right next to them (it would overlap).
    ends = set() if step == 1 else {i for i in dropped if i - 1 not in dropped or i + 1 not in dropped}
    ticks = sorted({t for t in range(0, num_layers, step) if not any(0 < abs(t - e) < step for e in ends)} | ends)
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{i:02d}" for i in ticks], fontsize=fontsize)
    for label, layer in zip(ax.get_yticklabels(), ticks, strict=True):
        if layer in dropped:
            label.set_color(DROPPED_COLOR)
            label.set_fontweight("bold")


def gate_heatmap_figure(
    steps: Sequence[int],
    values: Sequence[Sequence[float]],
    dropped: Sequence[int] | None = None,
    budget: Sequence[float] | None = None,
    title: str = "",
    size: tuple[float, float] | None = None,
    drop_label: str = "drop",
    font_scale: float = 1.0,
) -> Figure:
    """Gate values over training as a labelled heat map: layers down (layer 0 on top), steps across, a colour bar.

    Layers in ``dropped`` get a red cell in a strip at the right and red row labels. ``budget`` (E3's annealed
    ``k``, the number of layers the sampler drops at each logged step) is drawn as a step line in a panel below::

        layer 00  ##########  | .      <- gate value colour, strip: red = dropped
        layer 01  ######....  | X
        k         _____/‾‾‾‾             <- only with ``budget``
                  steps ->

    Args:
        steps: Logged global steps, increasing.
        values: ``values[layer][i]`` is the gate value (1 = open) at ``steps[i]``; ``nan`` is drawn blank.
        dropped: Layers to mark as dropped; None draws no strip.
        budget: One value per logged step for the ``k`` panel; None draws no panel.
        title: Figure title.
        size: ``(width, height)`` in inches at 100 dpi; default grows with the number of steps and layers.
        drop_label: Title of the strip.
        font_scale: Multiplies every font size (TensorBoard shows images shrunk to its card width: use about 1.8);
            layer labels thin out so they do not overlap.

    Returns:
        A ``matplotlib.figure.Figure`` (no pyplot; save it or render it with :func:`figure_rgb`).
    """
    import numpy as np

    num_layers = len(values)
    if not steps or num_layers == 0:
        raise ReportError(f"A gate heat map needs at least one step and one layer, got {len(steps)} x {num_layers}.")
    if any(len(row) != len(steps) for row in values):
        raise ReportError(f"Every layer needs one gate value per step ({len(steps)}).")
    if budget is not None and len(budget) != len(steps):
        raise ReportError(f"`budget` has {len(budget)} values for {len(steps)} steps.")
    bad = sorted(i for i in dropped or () if not 0 <= i < num_layers)
    if bad:
        raise ReportError(f"Dropped layers {bad} are outside [0, {num_layers}).")
    if size is None:
        size = (min(14.0, 5.0 + 0.08 * len(steps)), min(16.0, 1.6 + 0.2 * num_layers + (1.2 if budget else 0.0)))
    fig = _new_figure(*size)
    small, medium = 7 * font_scale, 8 * font_scale
    rows = 2 if budget is not None else 1
    heights = [3.0, 1.0][:rows] if font_scale > 1 else [max(3.0, 0.2 * num_layers), 1.0][:rows]
    grid = fig.add_gridspec(rows, 2, width_ratios=[40, 1], height_ratios=heights)
    ax = fig.add_subplot(grid[0, 0])
    # Cell edges half-way between logged steps: irregular logging (every n steps + the last step) keeps its spacing.
    x = np.asarray(steps, dtype=float)
    mids = (x[1:] + x[:-1]) / 2 if len(x) > 1 else np.empty(0)
    half = (x[1] - x[0]) / 2 if len(x) > 1 else 0.5
    last_half = (x[-1] - x[-2]) / 2 if len(x) > 1 else 0.5
    x_edges = np.concatenate([[x[0] - half], mids, [x[-1] + last_half]])
    y_edges = np.arange(num_layers + 1) - 0.5
    grid_values = np.ma.masked_invalid(np.asarray(values, dtype=float))
    mesh = ax.pcolormesh(x_edges, y_edges, grid_values, cmap="viridis", vmin=0.0, vmax=1.0, shading="flat")
    ax.set_ylim(num_layers - 0.5, -0.5)
    ax.set_xlim(x_edges[0], x_edges[-1])
    ax.set_ylabel("layer", fontsize=medium)
    ax.tick_params(labelsize=small)
    # Rows must be at least a label high: estimate the map's height in points from the figure height.
    map_points = size[1] * 72 * 0.75 * heights[0] / sum(heights)
    step = next(n for n in (1, 2, 5, 10, 20, 50) if map_points / num_layers * n >= 1.3 * small or n == 50)
    _layer_ticks(ax, num_layers, dropped or [], step=step, fontsize=small)
    ax.set_title(title, fontsize=medium)

    strip = fig.add_subplot(grid[0, 1], sharey=ax)
    if dropped is not None:
        from matplotlib.colors import to_rgb

        colors = np.array([to_rgb(DROPPED_COLOR if i in dropped else STRIP_KEPT_COLOR) for i in range(num_layers)])
        strip.imshow(colors[:, None, :], aspect="auto", extent=(0, 1, num_layers - 0.5, -0.5))
        strip.set_title(drop_label, fontsize=small)
    strip.set_xticks([])
    strip.tick_params(labelleft=False, left=False)
    bar = fig.colorbar(mesh, ax=[ax, strip], shrink=0.8)
    bar.set_label("gate (1 = open)", fontsize=small)
    bar.ax.tick_params(labelsize=small)

    if budget is None:
        ax.set_xlabel("step", fontsize=medium)
        return fig
    ax.tick_params(labelbottom=False)
    panel = fig.add_subplot(grid[1, 0], sharex=ax)
    panel.step(x, np.asarray(budget, dtype=float), where="post", color=KEPT_COLOR)
    panel.set_ylabel("k", rotation=0, labelpad=10, fontsize=medium)
    panel.set_ylim(bottom=0)
    panel.yaxis.get_major_locator().set_params(integer=True)
    panel.tick_params(labelsize=small)
    panel.set_xlabel("step (k = layers the sampler drops)", fontsize=small)
    panel.grid(alpha=0.3)
    return fig


def figure_rgb(fig: Figure) -> Any:
    """Render a figure with the Agg backend (no GUI, no pyplot) to a ``uint8`` array ``[height, width, 3]``."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def gate_trajectory_png(
    run_dir: str | Path,
    out_png: str | Path,
    scope: str = "mask",
    mask: str | Path | MaskArtifact | None = None,
) -> Path:
    """Heat map of the per-layer gate values of a mask search over training steps (rows = layers, layer 0 on top).

    A strip on the right marks the layers the final mask drops (red), and their row labels are red too. When the run
    logged E3's layer budget (``schedule/k``, from ``TopKAnnealing``), a panel below shows it over the steps::

        layer 00  ##########  |  .
        layer 01  ######....  |  X    <- dropped by mask.json
                  steps ->

    Args:
        run_dir: TensorBoard version folder of a mask search run (with ``MaskMonitor``).
        out_png: Where to write the PNG (parent folders are created).
        scope: The ``MaskMonitor(scope=...)`` of the run.
        mask: The final mask; default ``run_dir/mask.json`` when it exists (no marks otherwise).

    Returns:
        The written path.

    Raises:
        ReportError: No event files, no gate scalars, or a mask for a different layer count.
    """
    run_dir = Path(run_dir)
    scalars = read_scalars(run_dir)
    steps, values = gate_history(scalars, scope)
    num_layers = len(values)
    if mask is None and (run_dir / "mask.json").is_file():
        mask = run_dir / "mask.json"
    artifact = _load(mask) if mask is not None else None
    if artifact is not None and artifact.num_layers != num_layers:
        raise ReportError(
            f"The mask has {artifact.num_layers} layers ({artifact.model}) but the run logged gates for {num_layers}: "
            "it belongs to another model or run."
        )
    title = f"{scope} gates over training: {run_dir.name}"
    if artifact is not None:
        segments = ", ".join(f"[{a}, {b})" for a, b in artifact.segments) or "none"
        title += f"\nmask: {artifact.method} drops {len(artifact.drop)}/{num_layers}, segments {segments}"
    else:
        title += " (no mask.json)"
    fig = gate_heatmap_figure(
        steps, values, artifact.drop if artifact is not None else None, _budget_at(scalars.get("schedule/k"), steps),
        title=title,
    )
    return _save(fig, out_png)


def _budget_at(points: Sequence[tuple[int, float]] | None, steps: Sequence[int]) -> list[float] | None:
    """The last logged budget at or before each step (None when the run logged none)."""
    if not points:
        return None
    out, i, current = [], 0, math.nan
    for step in steps:
        while i < len(points) and points[i][0] <= step:
            current = points[i][1]
            i += 1
        out.append(current)
    return out


def importance_png(masks: Mapping[str, str | Path | MaskArtifact], out_png: str | Path) -> Path:
    """Per-layer importance ``scores`` of several masks side by side, dropped layers in red.

    One panel per mask (its own score axis, since methods score on different scales), layers as rows sharing one
    axis with layer 0 on top. Masks of window methods, ``tail``, ``random`` or a CLP search carry no per-layer
    scores; use an E3 search (its keep-logits) or the ``block_influence``, ``kl_importance`` or ``sleb`` baselines.

    Args:
        masks: ``{name: mask.json path or MaskArtifact}``, in display order.
        out_png: Where to write the PNG.

    Returns:
        The written path.

    Raises:
        ReportError: No masks, a mask without scores, or masks for different layer counts.
    """
    if not masks:
        raise ReportError("importance_png needs at least one mask: {name: path/to/mask.json}.")
    artifacts = {name: _load(mask, name=f"mask {name!r}") for name, mask in masks.items()}
    for name, artifact in artifacts.items():
        if artifact.scores is None:
            raise ReportError(
                f"Mask {name!r} ({artifact.method}, {artifact.model}) has no per-layer `scores`, so there is nothing "
                "to plot. Importance plots need a method that scores every layer: an E3 search (keep-logits) or "
                "the block_influence, kl_importance or sleb baselines."
            )
    counts = {name: a.num_layers for name, a in artifacts.items()}
    if len(set(counts.values())) > 1:
        raise ReportError(f"The masks are for models with different layer counts {counts}; compare masks of one model.")
    num_layers = next(iter(counts.values()))

    fig = _new_figure(width=1.2 + 2.6 * len(artifacts), height=min(16.0, 1.6 + 0.2 * num_layers))
    axes = fig.subplots(1, len(artifacts), sharey=True, squeeze=False)[0]
    for ax, (name, artifact) in zip(axes, artifacts.items(), strict=True):
        dropped = set(artifact.drop)
        colors = [DROPPED_COLOR if i in dropped else KEPT_COLOR for i in range(num_layers)]
        ax.barh(range(num_layers), artifact.scores, color=colors, height=0.8)
        ax.axvline(0.0, color="black", linewidth=0.5)
        ax.set_title(f"{name}\n{artifact.method}: drop {len(dropped)}/{num_layers}", fontsize=8)
        ax.set_xlabel("score (higher = keep)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    axes[0].set_ylim(num_layers - 0.5, -0.5)
    axes[0].set_ylabel("layer")
    _layer_ticks(axes[0], num_layers, dropped=[])
    return _save(fig, out_png)


def _check_records(
    records: Sequence[Mapping[str, Any]], figure: str, noun: str, fields: tuple[str, str, str],
    positive: tuple[str, ...],
) -> list[tuple[str, float, float]]:
    """``(label, x, y)`` per record of ``fields`` (a label key, two number keys); ``positive`` numbers must be > 0."""
    label, first, second = fields
    shape = "{" + ", ".join(fields) + "}"
    if not records:
        raise ReportError(f"{figure} needs at least one {noun}: [{shape}, ...].")
    checked = []
    for i, record in enumerate(records):
        where = f"{noun.capitalize()} {i} ({dict(record)})"
        missing = [key for key in fields if key not in record]
        if missing:
            raise ReportError(f"{where} lacks {missing}; each {noun} is {shape}.")
        try:
            values = float(record[first]), float(record[second])
        except (TypeError, ValueError):
            raise ReportError(f"{where}: {first} and {second} must be numbers.") from None
        if not all(math.isfinite(v) and (key not in positive or v > 0) for key, v in zip((first, second), values)):
            rule = "; ".join(f"{key} must be finite" + (" and > 0" if key in positive else "")
                             for key in (first, second))
            raise ReportError(f"{where}: {rule}.")
        checked.append((str(record[label]), *values))
    return checked


def retention_speedup_png(points: Sequence[Mapping[str, Any]], out_png: str | Path, title: str | None = None) -> Path:
    """Scatter of quality retained against speed gained, one labelled point per model or method.

    Args:
        points: ``[{"name": str, "retention": float, "speedup": float}, ...]``; retention is pruned quality over dense
            quality (e.g. dense ppl / pruned ppl, or an accuracy ratio), speedup is dense time over pruned time.
        out_png: Where to write the PNG.
        title: Optional figure title.

    Returns:
        The written path.

    Raises:
        ReportError: No points, a point without the three keys, or non-numeric / non-finite values.
    """
    checked = _check_records(points, "retention_speedup_png", "point", ("name", "retention", "speedup"),
                             positive=("speedup",))
    fig = _new_figure(width=5.5, height=4.0)
    ax = fig.add_subplot()
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    speedups = [speedup for _, _, speedup in checked]
    middle = (min(speedups) + max(speedups)) / 2
    for name, retention, speedup in checked:
        ax.scatter([speedup], [retention], s=30, color=KEPT_COLOR, zorder=3)
        # Labels point inwards, so the figure does not have to grow to fit them.
        right_half = speedup > middle
        ax.annotate(
            name, (speedup, retention), textcoords="offset points", xytext=(-5 if right_half else 5, 4),
            ha="right" if right_half else "left", fontsize=8,
        )
    ax.set_xlabel("speed-up (dense time / pruned time)")
    ax.set_ylabel("retention (pruned quality / dense quality)")
    ax.margins(0.15)
    ax.set_title(title or "Quality retained vs speed gained", fontsize=9)
    return _save(fig, out_png)


def speedup_png(rows: Sequence[Mapping[str, Any]], out_png: str | Path, title: str | None = None) -> Path:
    """Horizontal bars of measured speed-up next to the ideal one, one pair per measurement (benchmarks/speed.py).

    Args:
        rows: ``[{"label": str, "speedup": float, "ideal": float}, ...]``, e.g. label
            ``"llama2-7b 25% prefill_1x2048"``.
        out_png: Where to write the PNG.
        title: Optional figure title.

    Raises:
        ReportError: No rows, a row without the three keys, or a non-positive or non-finite value.
    """
    checked = _check_records(rows, "speedup_png", "row", ("label", "speedup", "ideal"), positive=("speedup", "ideal"))
    fig = _new_figure(width=6.5, height=1.0 + 0.32 * len(checked))
    ax = fig.add_subplot()
    positions = list(range(len(checked)))[::-1]  # first row on top
    ax.barh([p + 0.2 for p in positions], [c[2] for c in checked], height=0.4, color="lightgrey", label="ideal")
    ax.barh([p - 0.2 for p in positions], [c[1] for c in checked], height=0.4, color=KEPT_COLOR, label="measured")
    for position, (_, speedup, ideal) in zip(positions, checked, strict=True):
        ax.annotate(f"{speedup / ideal:.2f} of ideal", (speedup, position - 0.2), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=7)
    ax.set_yticks(positions)
    ax.set_yticklabels([c[0] for c in checked], fontsize=7)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("speed-up over dense")
    ax.set_xlim(0, max(max(c[1], c[2]) for c in checked) * 1.3)  # room for the "of ideal" labels
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title or "Pruned vs dense: measured and ideal speed-up", fontsize=9)
    return _save(fig, out_png)


def task_retention_png(results: Mapping[str, Any], out_png: str | Path, title: str | None = None) -> Path:
    """Grouped bars of accuracy retention per task (and both averages), one colour per non-reference model.

    Args:
        results: What ``python -m lit_prune evaluate`` writes to ``results.json`` (``models.<name>.retention`` with
            ``tasks``, ``mean_of_ratios`` and ``ratio_of_means``).
        out_png: Where to write the PNG.
        title: Optional figure title.

    Raises:
        ReportError: No model other than the reference has a task retention.
    """
    models = {name: entry["retention"] for name, entry in (results.get("models") or {}).items()
              if (entry.get("retention") or {}).get("tasks")}
    if not models:
        raise ReportError("task_retention_png needs results with task retentions of at least one non-reference model "
                          "(run `python -m lit_prune evaluate` with --tasks and two or more models).")
    labels = list(next(iter(models.values()))["tasks"]) + ["mean of ratios", "ratio of means"]
    fig = _new_figure(width=max(5.5, 0.9 * len(labels) * max(1, len(models)) ** 0.5 + 2), height=3.8)
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    for i, (name, ret) in enumerate(models.items()):
        values = [ret["tasks"].get(t) for t in labels[:-2]] + [ret.get("mean_of_ratios"), ret.get("ratio_of_means")]
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width=width * 0.95, label=name)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"accuracy retention (model / {results.get('reference', 'reference')})")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title or "Zero-shot accuracy retained, per task", fontsize=9)
    return _save(fig, out_png)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def _named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (e.g. bi=runs/.../mask.json), got {text!r}")
    return name, Path(path)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """``python -m lit_prune.reports RUN_DIR [--masks NAME=PATH ...] [--points FILE] --out DIR``.

    Writes ``gate_trajectory.png`` (from RUN_DIR), ``importance.png`` (with ``--masks``) and
    ``retention_speedup.png`` (with ``--points``) into ``--out`` and returns their paths. Input errors exit with a
    one-line message on the command line and raise :class:`ReportError` when called with ``argv``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m lit_prune.reports",
        description="Write report PNGs from a run folder (TensorBoard events + mask.json) and mask files.",
    )
    parser.add_argument("run_dir", type=Path, help="TensorBoard version folder of a mask search run.")
    parser.add_argument(
        "--masks", nargs="+", type=_named_path, default=[], metavar="NAME=PATH",
        help="mask.json files with per-layer scores, plotted side by side in importance.png.",
    )
    parser.add_argument(
        "--points", type=Path, help='JSON list of {"name", "retention", "speedup"} for retention_speedup.png.'
    )
    parser.add_argument("--scope", default="mask", help="MaskMonitor scope of the gate scalars (default: mask).")
    parser.add_argument("--out", type=Path, required=True, help="Output folder (created if missing).")
    args = parser.parse_args(argv)
    try:
        names = [name for name, _ in args.masks]
        if len(set(names)) != len(names):
            raise ReportError(f"--masks names must be unique, got {names}.")
        written = [gate_trajectory_png(args.run_dir, args.out / "gate_trajectory.png", scope=args.scope)]
        if args.masks:
            written.append(importance_png(dict(args.masks), args.out / "importance.png"))
        if args.points is not None:
            try:
                points = json.loads(args.points.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ReportError(f"--points {str(args.points)!r} is not a readable JSON list: {err}") from None
            if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
                raise ReportError(f"--points {str(args.points)!r} must hold a JSON list of objects.")
            written.append(retention_speedup_png(points, args.out / "retention_speedup.png"))
    except ReportError as err:
        if argv is not None:
            raise
        sys.exit(f"error: {err}")
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
