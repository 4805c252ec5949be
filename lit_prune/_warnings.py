"""The one place that hides known-harmless third-party noise, so what the commands print is ours.

``quiet_third_party()`` runs first thing in ``lit_prune.cli.main``. ``quiet_import_noise()`` (only the log lines that
importing torchao prints) runs where models load, ``lit_prune.hf``, so library users, notebooks and benchmarks are
spared them too; it touches no warning filter. Each entry names what it hides and why it is harmless here; anything
else still shows. ``LIT_PRUNE_DEBUG=1`` shows everything.
"""

from __future__ import annotations

import logging
import os
import warnings

# (logger name, message start): log records dropped.
_IMPORT_NOISE = (
    # torchao (pulled in by transformers' quantizer registry whenever it is installed) tries CUDA / other-Python
    # kernels it cannot load on this machine; nothing of ours uses them (quantize uses its int8 weight-only path).
    ("torchao", "Failed to load "),
    # torchao registers Enum types with torch's pytree at import; a deprecation notice addressed to torchao.
    ("torch.utils._pytree", "%s is an Enum subclass"),
)
_LOG_NOISE = (
    *_IMPORT_NOISE,
    # Lightning's adverts for its cloud services.
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip:"),
)

# Warning message regexes (matched at the start) dropped.
_WARNING_NOISE = (
    # Lightning's own code uses torch's deprecated LeafSpec; addressed to Lightning.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # MaskSearch (and the recovery stages' teacher) keep the frozen LM in eval mode on purpose: no dropout in the KL.
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # Our EpochShuffleSampler replays the epoch's order from the seed and the step, so a mid-epoch resume is exact.
    r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable",
    # peft's PeftModel reads transformers' renamed `is_gradient_checkpointing` property; addressed to peft.
    r"`is_gradient_checkpointing` is deprecated",
)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_installed: set[tuple[str, str]] = set()


def _drop_log_lines(entries: tuple[tuple[str, str], ...]) -> None:
    for name, prefix in entries:
        if (name, prefix) not in _installed:
            _installed.add((name, prefix))
            logging.getLogger(name).addFilter(_DropPrefix(prefix))


def quiet_import_noise() -> None:
    """Drop the log lines torchao prints when transformers imports it; a no-op under ``LIT_PRUNE_DEBUG=1``."""
    if os.environ.get("LIT_PRUNE_DEBUG") != "1":
        _drop_log_lines(_IMPORT_NOISE)


def quiet_third_party() -> None:
    """Install every filter above (idempotent); a no-op under ``LIT_PRUNE_DEBUG=1``."""
    if os.environ.get("LIT_PRUNE_DEBUG") == "1":
        return
    for pattern in _WARNING_NOISE:  # idempotent: an identical filter replaces the old one
        warnings.filterwarnings("ignore", message=pattern)
    _drop_log_lines(_LOG_NOISE)
