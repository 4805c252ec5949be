"""ModelExport: write the stage's mask.json (and, on request, the pruned model) when fit ends; rank 0 writes.

``save_pruned_model`` is called on every rank, so that a sharded strategy can gather the weights; it must write on
rank 0 only. ``mask_artifact`` is called on every rank too and must not differ between ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
from typing_extensions import override

from lit_prune.components.checks import check_choice
from lit_prune.components.mask_io import save_mask

ExportWhat = Literal["mask", "model", "both"]


class ModelExport(L.Callback):
    """Export the result of a lit_prune stage (or any module with ``mask_artifact()``) at the end of fit.

    Writes ``<dirpath>/mask.json`` and, with ``what: model|both``, ``<dirpath>/pruned/`` (a vanilla HF checkpoint).

    Args:
        what: ``mask`` writes mask.json; ``model`` the pruned checkpoint; ``both`` both.
        dirpath: Output folder; default: the run's log directory (``trainer.log_dir``), else ``default_root_dir``.
        overwrite: Replace a non-empty ``pruned/`` folder.
    """

    def __init__(
        self, what: ExportWhat = "mask", dirpath: str | None = None, overwrite: bool = False
    ) -> None:
        check_choice(what, ExportWhat, "ModelExport(what=...)")
        self.what = what
        self.dirpath = dirpath
        self.overwrite = overwrite
        self.written: list[Path] = []

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        needed = ["mask_artifact"] + (["save_pruned_model"] if self.what != "mask" else [])
        missing = [name for name in needed if not callable(getattr(pl_module, name, None))]
        if missing:
            raise RuntimeError(
                f"`ModelExport(what={self.what!r})` needs {type(pl_module).__name__}.{', '.join(missing)}(). "
                "Use it with a lit_prune stage, or implement those methods."
            )

    def output_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = self.output_dir(trainer)
        artifact = pl_module.mask_artifact()
        if self.what in ("model", "both"):
            # Every rank calls it: a sharded strategy gathers the weights collectively, and rank 0 writes.
            pl_module.save_pruned_model(str(out / "pruned"), overwrite=self.overwrite)
        if not trainer.is_global_zero:
            return
        if self.what in ("mask", "both"):
            self.written.append(save_mask(out / "mask.json", artifact))
        if self.what in ("model", "both"):
            self.written.append(out / "pruned")
        pl_module.print(f"{artifact.describe()}\nwrote {', '.join(str(p) for p in self.written)}")
