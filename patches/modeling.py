"""PreTrainedModel.from_pretrained: load where and how the Apple GPU can train, whatever the script asked.

Corrects, at the library call and not by the script's argument names, so any script gets it:
- `torch_dtype`/`dtype` bfloat16 (upstream's `--torch_dtype bfloat16`): MPS has no bf16 before torch 2.3 / macOS 14,
  and with fp32 compute a half-precision base cannot feed fp32 trainable modules: the plan's weights dtype instead.
- an integer or CUDA `device_map` (upstream's `{"": int(LOCAL_RANK)}`) means CUDA:0 ("Torch not compiled with CUDA
  enabled"; "Cannot access accelerator device when none is available" from torch 2.5): the Apple GPU instead.
- `attn_implementation="flash_attention_2"` (flash-attn has no macOS build): `sdpa`.
- bitsandbytes 4/8-bit (`quantization_config`, `load_in_4bit`, `load_in_8bit`): kept only where the installed
  bitsandbytes runs on MPS (0.50+, its MPS backend, with torch 2.9+), else loaded in 16 bits with one line.
- `use_auth_token`, removed in transformers 5.0 (TypeError from the model's __init__): `token`, on every machine.
Versions: transformers 4.40-5.x.
"""
from __future__ import annotations

from mps_shim.registry import Patch

CUDA_DEVICE_PREFIXES = ("cuda",)
QUANTIZATION_KEYS = ("quantization_config", "load_in_4bit", "load_in_8bit")


def is_cuda_placement(value) -> bool:
    """An integer device or a CUDA device name: what `device_map={"": 0}` and friends mean."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    text = str(value)
    return text.startswith(CUDA_DEVICE_PREFIXES) or text.isdigit()


def rewrite_device_map(device_map, device: str):
    """The same map with every CUDA placement on `device`; None when nothing changes."""
    if isinstance(device_map, dict):
        if any(is_cuda_placement(v) for v in device_map.values()):
            return {k: (device if is_cuda_placement(v) else v) for k, v in device_map.items()}
        return None
    if device_map is not None and is_cuda_placement(device_map):
        return {"": device}
    return None


def bitsandbytes_runs_on_mps(facts) -> bool:
    from mps_shim.versions import compare, installed_version

    if facts.simulated:
        return False  # the simulated GPU computes on the CPU: bitsandbytes' MPS kernels cannot be exercised there
    return compare(installed_version("bitsandbytes"), ">=", "0.50") and compare(facts.torch, ">=", "2.9")


class FromPretrainedPatch(Patch):
    target = "transformers.modeling_utils"
    distribution = "transformers"
    supported = ">=4.40,<6"
    corrects = "bf16 weights, CUDA device_map, flash-attention, bitsandbytes and use_auth_token at model load"

    def apply(self, module) -> None:
        from mps_shim.versions import compare, module_version

        self.accepts_use_auth_token = compare(module_version(module), "<", "5.0.0.dev0")
        self.wrap(module.PreTrainedModel, "from_pretrained", self._from_pretrained)

    def _from_pretrained(self, wrapped, cls, args, kwargs):
        kwargs = dict(kwargs)
        change = self.runtime.report.change
        if "use_auth_token" in kwargs and not self.accepts_use_auth_token:
            token = kwargs.pop("use_auth_token")
            if token is not None:
                kwargs.setdefault("token", token)
            change("from_pretrained(use_auth_token=)", "use_auth_token", "token", "removed in transformers 5.0")
        if not self.runtime.changes_numbers:
            return wrapped(*args, **kwargs)
        self._rewrite_for_mps(kwargs, change)
        model = wrapped(*args, **kwargs)
        self.runtime.place(model)
        return model

    def _rewrite_for_mps(self, kwargs: dict, change) -> None:
        import torch

        runtime = self.runtime
        facts = runtime.facts
        dtype_key = "dtype" if "dtype" in kwargs else "torch_dtype"
        asked = kwargs.get(dtype_key)
        asked_name = None if asked is None else str(asked).replace("torch.", "")
        plan = runtime.precision.decide(model_dtype=asked_name)
        keep_checkpoint_dtype = asked_name in (None, "auto") and facts.capabilities.bf16_tensors
        if not keep_checkpoint_dtype and asked_name != plan.weights_dtype:
            kwargs[dtype_key] = getattr(torch, plan.weights_dtype)
            change(f"from_pretrained({dtype_key}=)", asked_name, plan.weights_dtype, plan.reason)

        placed = rewrite_device_map(kwargs.get("device_map"), facts.compute_device)
        if placed is not None:
            shown = "the Apple GPU (simulated: computed on the CPU)" if facts.simulated else "the Apple GPU"
            change("from_pretrained(device_map=)", kwargs["device_map"], placed, f"CUDA placement; {shown}")
            kwargs["device_map"] = placed

        if kwargs.get("attn_implementation") == "flash_attention_2":
            change("from_pretrained(attn_implementation=)", "flash_attention_2", "sdpa", "flash-attn has no macOS build")
            kwargs["attn_implementation"] = "sdpa"
        if kwargs.pop("use_flash_attention_2", False):
            change("from_pretrained(use_flash_attention_2=)", True, None, "flash-attn has no macOS build; sdpa")

        asked_quantization = {k: kwargs[k] for k in QUANTIZATION_KEYS if kwargs.get(k)}
        if asked_quantization and not bitsandbytes_runs_on_mps(facts):
            for key, value in asked_quantization.items():
                kwargs.pop(key)
                change(
                    f"from_pretrained({key}=)", type(value).__name__ if key == "quantization_config" else value,
                    None, "bitsandbytes does not run on this Mac (needs bitsandbytes>=0.50 and torch>=2.9): "
                    f"loading unquantized in {plan.weights_dtype} instead",
                )


PATCH = FromPretrainedPatch
