"""The mask artifact: the contract between stages and with users (``mask.json``).

Layer indices are 0-based; segments are ``[start, end)``, end-exclusive::

    {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "num_layers": 30, "drop": [13, 14, 15, 16, 17, 18],
     "segments": [[13, 19]], "method": "clp", "scores": null}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_prune.components.surgery import contiguous_segments, validate_drop
from lit_prune.io import write_text_atomically

REQUIRED_KEYS = ("model", "num_layers", "drop")


class MaskError(ValueError):
    """A mask artifact is malformed or does not fit the model it is applied to."""


@dataclass
class MaskArtifact:
    """Which decoder layers to drop from which model, and how that was decided.

    Args:
        model: Id or path of the dense model the mask was made for.
        num_layers: Decoder layers of that model.
        drop: Sorted 0-based indices of the layers to remove.
        method: What produced the mask (``clp``, ``e3``, ``shortgpt``, ``manual``, ...).
        scores: Optional per-layer importance (higher = more important), one value per layer.
        extra: Anything else worth keeping (search settings, final loss, ...).
    """

    model: str
    num_layers: int
    drop: list[int]
    method: str = "manual"
    scores: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) or self.num_layers < 1:
            raise MaskError(f"`num_layers` must be a positive integer, got {self.num_layers!r}.")
        try:
            self.drop = validate_drop(self.drop, self.num_layers)
        except ValueError as err:
            raise MaskError(str(err)) from None
        if self.scores is not None:
            if len(self.scores) != self.num_layers:
                raise MaskError(
                    f"`scores` must have one value per layer ({self.num_layers}), got {len(self.scores)} values."
                )
            self.scores = [float(s) for s in self.scores]

    @property
    def segments(self) -> list[tuple[int, int]]:
        """Contiguous dropped runs as ``[start, end)`` pairs."""
        return contiguous_segments(self.drop)

    @property
    def keep(self) -> list[int]:
        """Indices of the layers that remain."""
        dropped = set(self.drop)
        return [i for i in range(self.num_layers) if i not in dropped]

    def keep_mask(self) -> list[bool]:
        """One bool per layer, True = keep."""
        dropped = set(self.drop)
        return [i not in dropped for i in range(self.num_layers)]

    def describe(self) -> str:
        """One line, the same everywhere: method, counts, segments, model."""
        segments = ", ".join(f"[{a}, {b})" for a, b in self.segments) or "none"
        return (
            f"{self.method}: drop {len(self.drop)}/{self.num_layers} layers, segments {segments} "
            f"(end-exclusive, 0-based) of {self.model}"
        )

    def __str__(self) -> str:
        return self.describe()

    def to_json(self) -> str:
        """The ``mask.json`` text: one key per line (see :func:`format_mask_json`)."""
        return format_mask_json(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "num_layers": self.num_layers,
            "drop": list(self.drop),
            "segments": [list(s) for s in self.segments],
            "method": self.method,
            "scores": self.scores,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "mask") -> MaskArtifact:
        if not isinstance(data, dict):
            raise MaskError(f"{source}: a mask must be a JSON object, got {type(data).__name__}.")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise MaskError(
                f"{source}: missing keys {missing}. A mask needs at least "
                '{"model": ..., "num_layers": ..., "drop": [...]} (0-based layer indices).'
            )
        if not isinstance(data["drop"], list):
            raise MaskError(f"{source}: `drop` must be a list of layer indices, got {data['drop']!r}.")
        try:
            artifact = cls(
                model=str(data["model"]),
                num_layers=data["num_layers"],
                drop=data["drop"],
                method=str(data.get("method") or "manual"),
                scores=data.get("scores"),
                extra=dict(data.get("extra") or {}),
            )
        except MaskError as err:
            raise MaskError(f"{source}: {err}") from None
        if "segments" in data and data["segments"] is not None:
            given = [tuple(s) for s in data["segments"]]
            if given != artifact.segments:
                raise MaskError(
                    f"{source}: `segments` {data['segments']} do not match `drop` {artifact.drop} "
                    f"(expected {[list(s) for s in artifact.segments]}, [start, end) end-exclusive). "
                    "Fix one of them, or delete `segments` and it will be derived from `drop`."
                )
        return artifact

    def check_fits(self, num_layers: int, model: str | None = None, allow_model_mismatch: bool = False) -> None:
        """Raise if this mask was made for a different model (layer count or id)."""
        if num_layers != self.num_layers:
            raise MaskError(
                f"The mask is for a model with {self.num_layers} decoder layers ({self.model}), but the model has "
                f"{num_layers}. Use a mask made for this model."
            )
        if model is not None and not allow_model_mismatch and not same_model(model, self.model):
            raise MaskError(
                f"The mask was made for model {self.model!r}, not {model!r}. Use the matching mask, or allow a "
                "model mismatch (`--allow-model-mismatch` / `allow_model_mismatch: true`) if the weights are the same."
            )


def same_model(a: str, b: str) -> bool:
    """Loose identity of two model ids or paths: the same last path component, case-insensitive."""
    from lit_prune.assets import canonical_model_id

    def name(x: str) -> str:
        return Path(canonical_model_id(x).rstrip("/")).name.lower()

    return name(a) == name(b)


def save_mask(path: str | Path, artifact: MaskArtifact) -> Path:
    """Write ``mask.json`` atomically (a crash never leaves a half-written file)."""
    return write_text_atomically(path, artifact.to_json())


def format_mask_json(data: dict[str, Any]) -> str:
    """One key per line, values compact, so a drop list reads as one line: ``"drop": [13, 14, 15]``."""
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in data.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def load_mask(path: str | Path) -> MaskArtifact:
    """Read and validate a ``mask.json``."""
    path = Path(path)
    if not path.is_file():
        raise MaskError(f"Mask file {str(path)!r} does not exist. Pass the mask.json written by a search run.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MaskError(f"Mask file {str(path)!r} is not valid JSON: {err}.") from None
    return MaskArtifact.from_dict(data, source=str(path))


def mask_from_segments(model: str, num_layers: int, segments: Sequence[Sequence[int]], method: str = "manual"):
    """Build a mask from ``[start, end)`` segments."""
    drop = sorted({i for start, end in segments for i in range(start, end)})
    return MaskArtifact(model=model, num_layers=num_layers, drop=drop, method=method)
