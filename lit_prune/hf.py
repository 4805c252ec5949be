"""Loading Hugging Face models: config, weights, a weightless (meta) model, and the checks that come first.

Pure transformers, no Lightning: components, the CLI tools and the stages all load through here, so a model id, a
local folder or an offline alias (``offline:smollm2-135m``) means the same everywhere, and a bad one gives the same
error, naming the option it came from, before any weight loads.
"""

from __future__ import annotations

import os
import socket
from typing import Literal
from urllib.parse import urlparse

import torch
from torch import nn

from lit_prune._warnings import quiet_import_noise
from lit_prune.assets import resolve_pretrained
from lit_prune.components.layers import check_supported, router_outputs_off

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
quiet_import_noise()  # transformers imports torchao (when installed) on the first load: its kernel-loading lines
LOADABLE_HINT = "Pass a hub id, a local folder with config.json, or offline:smollm2-135m."


def torch_dtype(dtype: Dtype | torch.dtype) -> torch.dtype | str:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``"auto"`` and torch dtypes pass through."""
    return dtype if isinstance(dtype, torch.dtype) or dtype == "auto" else getattr(torch, dtype)


def read_config(
    pretrained: str,
    key: str = "model.init_args.pretrained",
    hint: str = LOADABLE_HINT,
    error: type[Exception] = ValueError,
):
    """Read a model's config (no weights); raise ``error`` naming ``key`` when it is not a loadable model."""
    from transformers import AutoConfig

    folder = resolve_pretrained(pretrained)
    if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "config.json")):
        raise error(f"`{key}`={pretrained!r} is a folder without config.json, so not a saved model (it holds "
                    f"{sorted(os.listdir(folder))[:4]}). {hint}")
    if not os.path.exists(folder) and (folder.startswith((".", "/", "~")) or folder.count("/") > 1):
        raise error(f"`{key}`={pretrained!r} is not a loadable model: there is no folder {os.path.abspath(folder)}, "
                    f"and it is no hub id either. Check the path. {hint}")
    if not os.path.exists(folder) and _hub_unreachable(folder):
        raise error(f"`{key}`={pretrained!r} is not a local folder, not in the local Hugging Face cache, and the hub "
                    "cannot be reached from here. Set HF_HUB_OFFLINE=1 to use only the cache, copy the model into a "
                    f"folder and pass that, or use an offline: name. {hint}")
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise error(f"`{key}`={pretrained!r} is not a loadable model: {str(err).rstrip('.')}. {hint}") from None


def _hub_unreachable(repo_id: str) -> bool:
    """True when ``repo_id`` is not cached and the hub's host does not even resolve (no network): answer at once
    instead of after the hub client's retries (about 25 s). Proxies and offline mode are left to the hub client."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return False
    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return False
    except ValueError:  # not a valid repo id: the hub client's own error says so
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return True
    return False


def load_config(pretrained: str, key: str = "model.init_args.pretrained"):
    """Read a model's config (no weights) and check that lit_prune can prune its architecture."""
    config = read_config(pretrained, key)
    check_supported(getattr(config, "model_type", None), source=f"`{key}`={pretrained!r}")
    return config


def load_causal_lm(pretrained: str, dtype: Dtype = "auto") -> nn.Module:
    """Load a causal LM by hub id, folder or offline alias."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_pretrained(pretrained), dtype=torch_dtype(dtype))
    router_outputs_off(model.config)  # mixture of experts: no router aux loss while the routers are frozen
    return model


def load_tokenizer(pretrained: str):
    """Load the tokenizer saved with a model (hub id, folder or offline alias)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_pretrained(pretrained))


def meta_model(config, dtype: Dtype = "auto") -> nn.Module:
    """The model's module structure without weights (device ``meta``): for early checks, and for FSDP ranks > 0."""
    from transformers import AutoModelForCausalLM

    dtype = config.dtype if dtype == "auto" else torch_dtype(dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    router_outputs_off(model.config)
    return model
