"""What the shim reads from and changes on a model (a transformers model, possibly wrapped by peft)."""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def trainable_parameters(model: Any) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def config_of(model: Any) -> Any:
    """The transformers config of a model, possibly wrapped by peft."""
    base = getattr(model, "base_model", None)
    for candidate in (model, base, getattr(base, "model", None)):
        config = getattr(candidate, "config", None)
        if config is not None and hasattr(config, "hidden_size"):
            return config
    return None


def is_checkpointing(model: Any) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def enable_checkpointing(model: Any) -> None:
    """Gradient checkpointing as LoRA needs it: non-reentrant (frozen inputs need no requires_grad), no KV cache."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "use_cache", None):
            config.use_cache = False


def upcast_trainable(model: Any) -> dict[str, int]:
    """Make every trainable floating-point parameter fp32 in place; {old dtype: count} of what changed."""
    import torch

    changed: dict[str, int] = {}
    for parameter in trainable_parameters(model):
        if parameter.is_floating_point() and parameter.dtype != torch.float32:
            name = str(parameter.dtype).replace("torch.", "")
            changed[name] = changed.get(name, 0) + 1
            parameter.data = parameter.data.float()
    return changed


def lower_frozen_weights(model: Any, dtype_name: str) -> int:
    """Frozen fp32 parameters to `dtype_name` in place (parameters keep their identity); how many changed."""
    import torch

    dtype = getattr(torch, dtype_name)
    count = 0
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.dtype == torch.float32:
            parameter.data = parameter.data.to(dtype)
            count += 1
    return count
