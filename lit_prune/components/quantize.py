"""Weight quantization of a (pruned) causal LM through maintained libraries: torchao and bitsandbytes.

We write no kernels: transformers' ``quantization_config`` hooks do the work, so a quantized folder reloads with plain
``AutoModelForCausalLM.from_pretrained`` (given the same library and a device it runs on).

=========================  ===========  ================  ====================================================
method                     devices      install           what
=========================  ===========  ================  ====================================================
``torchao-int8-weight``    cpu, cuda    ``lit_prune[quant]``       int8 weights per output row, activations stay float
``bnb-int8``               cuda         ``lit_prune[quant-cuda]``  LLM.int8() (bitsandbytes 8-bit, outlier threshold 6)
``bnb-nf4``                cuda         ``lit_prune[quant-cuda]``  4-bit NormalFloat, double-quantized block scales
=========================  ===========  ================  ====================================================

Only the ``nn.Linear`` layers of the decoder are quantized; embeddings and the output head stay in the float dtype
(both libraries' defaults). Every choice is checked (name, device, installed library) before any weight loads.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_prune import hf
from lit_prune.io import prepare_output_dir, save_checkpoint_folder

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class QuantizationError(ValueError):
    """A quantization choice that cannot work here (unknown method, wrong device, missing library)."""


@dataclasses.dataclass(frozen=True)
class QuantMethod:
    """One quantization method: where it runs and what it needs."""

    name: str
    package: str  # import name of the library that does the work
    extra: str  # lit_prune extra that installs it
    devices: tuple[str, ...]
    description: str


METHODS: dict[str, QuantMethod] = {
    m.name: m
    for m in (
        QuantMethod("torchao-int8-weight", "torchao", "quant", ("cpu", "cuda"),
                    "torchao Int8WeightOnlyConfig: int8 weights (per-row scales), float activations"),
        QuantMethod("bnb-int8", "bitsandbytes", "quant-cuda", ("cuda",),
                    "bitsandbytes LLM.int8(): int8 weights, fp16 outlier columns"),
        QuantMethod("bnb-nf4", "bitsandbytes", "quant-cuda", ("cuda",),
                    "bitsandbytes 4-bit NormalFloat, double-quantized scales, compute in bf16"),
    )
}


def device_type(device: str | torch.device | None) -> str:
    """``cuda``/``cpu``/... of a device spec; ``None`` means cuda when available, else cpu."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def check_method(method: str, device: str | torch.device | None = None, key: str = "--method") -> QuantMethod:
    """Validate a method name against the device and the installed libraries; loads no weights.

    Raises:
        QuantizationError: Names ``key``, the value, what is allowed and how to fix it.
    """
    if method not in METHODS:
        raise QuantizationError(
            f"`{key}`={method!r} is not a quantization method. Allowed: {', '.join(METHODS)}."
        )
    spec = METHODS[method]
    kind = device_type(device)
    if kind not in spec.devices:
        cpu_ok = [m.name for m in METHODS.values() if kind in m.devices]
        raise QuantizationError(
            f"`{key}`={method!r} runs on {'/'.join(spec.devices)} only ({spec.package} kernels), but the device is "
            f"{kind!r}. "
            f"On {kind} use {' or '.join(repr(m) for m in cpu_ok) or 'no quantization'}; for {method!r} run on a "
            "CUDA GPU."
        )
    if kind == "cuda" and not torch.cuda.is_available():
        raise QuantizationError(
            f"`{key}`={method!r} was asked to run on CUDA, but torch.cuda.is_available() is False (torch "
            f"{torch.__version__}). Install a CUDA build of torch, or use 'torchao-int8-weight' on the CPU."
        )
    if importlib.util.find_spec(spec.package) is None:
        raise QuantizationError(
            f"`{key}`={method!r} needs the {spec.package!r} package, which is not installed. Install it with "
            f"`pip install 'lit_prune[{spec.extra}]'` (or `pip install {spec.package}`)."
        )
    return spec


def quantization_config(method: str, compute_dtype: torch.dtype = torch.bfloat16):
    """The transformers ``quantization_config`` object of a method (call :func:`check_method` first)."""
    if method == "torchao-int8-weight":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    from transformers import BitsAndBytesConfig

    if method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if method == "bnb-nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    raise QuantizationError(f"Unknown quantization method {method!r}. Allowed: {', '.join(METHODS)}.")


def saved_quantization(config) -> str | None:
    """The method a saved checkpoint was quantized with (``None`` when it holds float weights)."""
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is None:
        return None
    qconfig = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    kind = qconfig.get("quant_method")
    if kind == "bitsandbytes":
        if qconfig.get("load_in_4bit"):
            return "bnb-nf4" if qconfig.get("bnb_4bit_quant_type", "nf4") == "nf4" else "bnb-fp4"
        return "bnb-int8"
    if kind == "torchao":
        quant_type = qconfig.get("quant_type") or {}
        inner = quant_type.get("default", quant_type) if isinstance(quant_type, dict) else {}
        return "torchao-int8-weight" if inner.get("_type") == "Int8WeightOnlyConfig" else f"torchao:{inner}"
    return str(kind)


def requirements_of(saved: str) -> str:
    """The listed method whose device and library a saved checkpoint needs (bnb-fp4 loads like bnb-nf4)."""
    if saved in METHODS:
        return saved
    return "bnb-nf4" if saved.startswith("bnb") else "torchao-int8-weight" if saved.startswith("torchao") else saved


def load_quantized(
    pretrained: str, method: str | None, device: str | None = None, dtype: str | torch.dtype = "auto",
    key: str = "--method",
) -> nn.Module:
    """Load a causal LM with its weights quantized by ``method`` (or a folder saved quantized, ``method=None``).

    bitsandbytes places weights while it loads them (it cannot be moved afterwards), so the model is loaded straight
    onto ``device``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from lit_prune.assets import resolve_pretrained

    path = resolve_pretrained(pretrained)
    saved = saved_quantization(AutoConfig.from_pretrained(path))
    if method is None and saved is None:
        raise QuantizationError(f"{pretrained!r} holds float weights; pass a quantization method.")
    if method is not None and saved is not None:
        raise QuantizationError(
            f"{pretrained!r} is already quantized ({saved}); `{key}`={method!r} would quantize it twice. Load it "
            "without a method, or quantize its float source."
        )
    check_method(method or requirements_of(saved), device, key=key if method else f"{pretrained!r} (saved with)")
    kind = device_type(device)
    torch_dtype = hf.torch_dtype(dtype)
    if torch_dtype == "auto" and (method or saved).startswith("bnb"):
        torch_dtype = torch.bfloat16  # bnb keeps non-quantized parts (norms, embeddings) in this dtype
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if method is not None:
        compute = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.bfloat16
        kwargs["quantization_config"] = quantization_config(method, compute)
    if kind == "cuda":
        index = torch.device(device).index if device is not None else None
        kwargs["device_map"] = {"": index if index is not None else torch.cuda.current_device()}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, looking inside tensor subclasses (torchao keeps int8 data + scales as inner tensors)."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    total = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)  # bnb 4-bit: block scales live beside the packed data
    if state is not None:
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif hasattr(value, "absmax"):  # nested (double-quant) state
                total += sum(v.numel() * v.element_size() for v in vars(value).values() if isinstance(v, torch.Tensor))
    return total


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage counted once (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        ident = id(tensor)
        if ident not in seen:
            seen.add(ident)
            total += tensor_bytes(tensor)
    return total


def quantized_linear_summary(model: nn.Module) -> dict[str, int]:
    """Count Linear-like modules whose weight is a low-bit type, and the float ones left (for reports and tests)."""
    low, float_ = 0, 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or not isinstance(weight, torch.Tensor):
            continue
        if is_low_bit(weight):
            low += 1
        else:
            float_ += 1
    return {"quantized_linear": low, "float_linear": float_}


def is_low_bit(weight: torch.Tensor) -> bool:
    """True for int8/uint8 storage or a tensor subclass that keeps an integer payload."""
    if type(weight) not in (torch.Tensor, nn.Parameter) and hasattr(type(weight), "__tensor_flatten__"):
        names, _ = weight.__tensor_flatten__()
        return any(not getattr(weight, n).dtype.is_floating_point for n in names)
    return weight.dtype in (torch.int8, torch.uint8)


def weight_files_bytes(folder: str | Path) -> int:
    """Bytes of the weight files in a checkpoint folder (``*.safetensors``, ``*.bin``; not the tokenizer)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def quantize_checkpoint(
    pretrained: str,
    method: str,
    out_dir: str | Path,
    device: str | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    load: Callable[..., nn.Module] = load_quantized,
) -> dict[str, Any]:
    """Quantize a saved model and write it with its tokenizer (and ``mask.json`` when it has one), atomically.

    Output folder, model config and method (device, library) are checked before any weight loads; a failure while
    loading or writing leaves nothing at ``out_dir``.

    Returns:
        A report: method, device, weight bytes on disk before and after, quantized Linear count.
    """
    from lit_prune.assets import resolve_pretrained

    prepare_output_dir(out_dir, overwrite, key="--out")
    check_method(method, device)
    hint = "Pass a folder written by `lit_prune export` or a recovery run, a hub id, or offline:smollm2-135m."
    hf.read_config(pretrained, key="--model", hint=hint, error=QuantizationError)
    source = Path(resolve_pretrained(pretrained))
    model = load(pretrained, method, device=device, dtype=dtype)
    tokenizer = hf.load_tokenizer(pretrained)
    report: dict[str, Any] = {
        "model": pretrained, "method": method, "device": device_type(device),
        "dtype": str(next(p for p in model.parameters() if p.dtype.is_floating_point).dtype).removeprefix("torch."),
        **quantized_linear_summary(model), "weight_bytes_in_memory": model_weight_bytes(model),
    }
    mask = source / "mask.json"
    mask_json = mask.read_text(encoding="utf-8") if mask.is_file() else None  # the pruned folder's mask travels on
    out = save_checkpoint_folder(out_dir, model, tokenizer, mask_json, overwrite, key="--out")
    report["out"] = str(out)
    report["weight_bytes_on_disk"] = weight_files_bytes(out)
    report["source_weight_bytes_on_disk"] = weight_files_bytes(source) if source.is_dir() else None
    return report


def merge_lora_dequantized(peft_model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Merge LoRA trained on a bitsandbytes base into a float copy of that base (vanilla, no peft, no bnb).

    Merging into the 4-bit weights would round ``W + BA`` back to NF4 and lose most of the update. Instead the base
    is dequantized (the exact values the adapter was trained against) and the adapter merged into that float copy.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    lora_config = peft_model.peft_config["default"]
    base = peft_model.unload()  # LoRA layers removed, bnb base layers back in place
    if "dtype" in _parameters(base.dequantize):
        base.dequantize(dtype=dtype)
    else:  # older transformers: dequantize to the compute dtype, then cast
        base.dequantize()
    base.to(dtype)
    merged = get_peft_model(base, dataclasses.replace(lora_config, inference_mode=True))
    set_peft_model_state_dict(merged, adapter)
    return merged.merge_and_unload()


def _parameters(fn: Callable) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)
