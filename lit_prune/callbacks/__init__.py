"""Reusable Lightning callbacks; each depends on a small module capability, never on a concrete stage class."""

from lit_prune.callbacks.export import ModelExport
from lit_prune.callbacks.mask_monitor import MaskMonitor
from lit_prune.callbacks.run_summary import RunSummary
from lit_prune.callbacks.step_schedule import StepSchedule
from lit_prune.callbacks.temperature import TemperatureSchedule
from lit_prune.callbacks.topk import TopKAnnealing

__all__ = ["MaskMonitor", "ModelExport", "RunSummary", "StepSchedule", "TemperatureSchedule", "TopKAnnealing"]
