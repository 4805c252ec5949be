"""What the stages need from Lightning's distributed strategies (DDP, FSDP), kept in one place.

- early errors for settings that cannot work together (precision vs weight dtype, FSDP wrap policy, double
  activation checkpointing, a float32 gate under a ``*-true`` precision), raised in ``setup`` before weights load;
- memory-lean FSDP loading: rank 0 reads the checkpoint on the CPU, the other ranks build the model on the meta
  device, and FSDP broadcasts rank 0's weights while it shards them (``sync_module_states``);
- small trainable modules (the layer gate) kept out of FSDP's flat parameters: a float32 gate cannot share one with
  bfloat16 weights, and a replicated gate can be read on any rank at any time; their gradients are averaged here;
- full weights gathered on rank 0 only (CPU offloaded) for export.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

MIXED_WITH_FP16 = ("16-mixed", "16", "16-true")
TRUE_PRECISIONS = ("bf16-true", "16-true", "64-true")


def fsdp_strategy(trainer: Any):
    """The trainer's ``FSDPStrategy``, or None for any other strategy (or no trainer)."""
    if trainer is None:
        return None
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = trainer.strategy
    return strategy if isinstance(strategy, FSDPStrategy) else None


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def decoder_layer_class_names(config) -> list[str]:
    """Decoder layer class names of a config's causal-LM class (transformers' ``_no_split_modules``)."""
    from transformers import AutoModelForCausalLM

    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return []
    return list(getattr(model_class, "_no_split_modules", None) or [])


def wrap_policy_classes(strategy) -> set[type] | None:
    """Module classes of an FSDP ``auto_wrap_policy`` given as classes (None if it is a callable we cannot read)."""
    policy = strategy.kwargs.get("auto_wrap_policy")
    if policy is None:
        return set()
    classes = getattr(policy, "_module_classes", None)
    return set(classes) if classes is not None else None


def checkpoints_activations(strategy) -> bool:
    """True when an FSDP strategy was given an ``activation_checkpointing_policy``."""
    return bool(getattr(strategy, "_activation_checkpointing_kwargs", None))


def check_run_settings(
    stage: Any, trainer: Any, float32_trainables: bool = False, float32_adapters: bool = False
) -> None:
    """Refuse strategy/precision/dtype combinations that cannot work, naming the keys to change.

    ``float32_trainables``: the stage trains small float32 modules kept out of FSDP (the gate).
    ``float32_adapters``: the stage adds float32 LoRA weights inside the decoder layers (peft upcasts adapters).
    """
    precision = str(trainer.precision)
    dtype = getattr(stage, "dtype_name", "auto")
    if dtype == "bfloat16" and precision in MIXED_WITH_FP16:
        raise ValueError(
            f"`trainer.precision`={precision!r} computes in float16, but `model.init_args.dtype`='bfloat16' weights "
            "can overflow float16. Use `trainer.precision: bf16-mixed` (or load with `dtype: float16`)."
        )
    strategy = fsdp_strategy(trainer)
    if strategy is None:
        return
    if getattr(strategy, "num_processes", 2) * getattr(strategy, "num_nodes", 1) == 1:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            "FSDP on one device shards nothing (torch switches to NO_SHARD), and its checkpoints of frozen weights "
            "can fail. On one GPU prefer `trainer.strategy: auto` with `model.init_args.gradient_checkpointing: true`."
        )
    if float32_trainables and precision in TRUE_PRECISIONS:
        raise ValueError(
            f"{type(stage).__name__} trains a small float32 module (the layer gate) that `trainer.precision`="
            f"{precision!r} would cast down under FSDP. Use `trainer.precision: bf16-mixed` with "
            "`model.init_args.dtype: bfloat16`: the frozen weights stay bfloat16 and the gate float32."
        )
    if float32_adapters and dtype != "float32":
        raise ValueError(
            f"LoRA adapters are float32 and FSDP flattens each decoder layer into one tensor, which cannot mix them "
            f"with `model.init_args.dtype`={dtype!r} weights. Under FSDP set `model.init_args.dtype: float32` and keep "
            "`trainer.precision: bf16-mixed`: the float32 weights are sharded and the matmuls run in bfloat16. "
            "Or set `model.init_args.train: all` (one dtype for every weight)."
        )
    if getattr(stage, "gradient_checkpointing", False) and checkpoints_activations(strategy):
        raise ValueError(
            "Activation checkpointing is set twice: `model.init_args.gradient_checkpointing: true` and "
            "`trainer.strategy.init_args.activation_checkpointing_policy`. Under FSDP keep the strategy's policy and "
            "set `gradient_checkpointing: false`."
        )
    expected = decoder_layer_class_names(stage.config)
    classes = wrap_policy_classes(strategy)
    if expected and classes is not None and not any(cls.__name__ in expected for cls in classes):
        given = sorted(cls.__name__ for cls in classes) or "none"
        module = type(stage.config).__module__.replace("configuration_", "modeling_")
        raise ValueError(
            f"`trainer.strategy.init_args.auto_wrap_policy` is {given}, which does not wrap the decoder layers of "
            f"{stage.pretrained!r} ({', '.join(expected)}): FSDP would keep the whole model in one unit and gather "
            f"all of it on every GPU. Set `auto_wrap_policy: [{module}.{expected[0]}]`."
        )


def prepare_fsdp_loading(trainer: Any, replicated: list[nn.Module]) -> bool:
    """Configure FSDP before it wraps the stage; return True where this rank should build weights on meta.

    ``replicated`` modules are left out of FSDP (``ignored_states``) and moved to the device here, since FSDP moves
    only what it manages.
    """
    strategy = fsdp_strategy(trainer)
    if strategy is None:
        return False
    if replicated:
        ignored = list(strategy.kwargs.get("ignored_states") or [])
        strategy.kwargs["ignored_states"] = ignored + [m for m in replicated if m not in ignored]
        for module in replicated:
            module.to(strategy.root_device)
    if strategy.world_size <= 1:
        return False
    device = strategy.root_device
    strategy.kwargs.setdefault("sync_module_states", True)
    strategy.kwargs.setdefault("param_init_fn", lambda module: module.to_empty(device=device, recurse=False))
    return strategy.global_rank != 0 and strategy.kwargs["sync_module_states"]


def _mean_over_ranks_(tensor: Tensor) -> Tensor:
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)  # gloo has no AVG
    return tensor.div_(torch.distributed.get_world_size())


def average_gradients_(parameters: list[Tensor]) -> None:
    """All-reduce and average gradients of parameters that no strategy wrapper reduces (FSDP-ignored ones)."""
    if not is_distributed():
        return
    for param in parameters:
        if param.grad is not None:
            _mean_over_ranks_(param.grad)


def broadcast_from_rank0_(parameters: list[Tensor]) -> None:
    """Make replicated parameters identical on every rank (rank 0's values)."""
    if not is_distributed():
        return
    for param in parameters:
        torch.distributed.broadcast(param.data, src=0)


def average_across_ranks(values: Tensor) -> Tensor:
    """Mean of a tensor over all ranks (the tensor itself when not distributed)."""
    return _mean_over_ranks_(values.clone()) if is_distributed() else values


def full_state_dict_on_rank0(trainer: Any) -> dict[str, Tensor] | None:
    """Every rank must call this under FSDP; rank 0 gets the LightningModule's full CPU state dict, others None."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = fsdp_strategy(trainer).model
    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
        state = root.state_dict()
    return state if trainer.is_global_zero else None


def clip_fsdp_gradients(trainer: Any, max_norm: float) -> Tensor:
    """Clip by the global norm over all shards (``torch.nn.utils.clip_grad_norm_`` would see only local shards)."""
    return fsdp_strategy(trainer).model.clip_grad_norm_(max_norm)
