"""PEFT entry points the upstream recipe calls with CUDA habits.

Corrects, on an Apple GPU (real or simulated):
- `PeftModel.from_pretrained(..., device_map={"": LOCAL_RANK})`: the integer means CUDA:0, as at model load
  (patches/modeling.py): the Apple GPU instead.
- `prepare_model_for_kbit_training` on a model that is not quantized (the shim loaded it in 16 bits because
  bitsandbytes does not run here): it would still cast every fp16/bf16 weight to fp32 (peft 0.7.1 and later), doubling
  the frozen model's memory for nothing. It freezes the weights and, as it would, sets up gradient checkpointing;
  the trainable weights are made fp32 by patches/trainer.py.
Versions: peft 0.7.1-0.21.
"""
from __future__ import annotations

from mps_shim.patches.modeling import rewrite_device_map
from mps_shim.registry import Patch


def is_quantized(model) -> bool:
    return bool(
        getattr(model, "is_loaded_in_8bit", False)
        or getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "quantization_method", None)
        or getattr(model, "is_quantized", False)
    )


class PeftLoadingPatch(Patch):
    target = "peft"
    distribution = "peft"
    supported = ">=0.7.1,<1"
    corrects = "integer device_map in PeftModel.from_pretrained; kbit preparation of an unquantized model"
    mac_only = True

    def apply(self, module) -> None:
        self.wrap(module.PeftModel, "from_pretrained", self._from_pretrained)
        self.wrap(module, "prepare_model_for_kbit_training", self._prepare_for_kbit)

    def _from_pretrained(self, wrapped, cls, args, kwargs):
        placed = rewrite_device_map(kwargs.get("device_map"), self.runtime.facts.compute_device)
        if placed is not None:
            self.runtime.report.change(
                "PeftModel.from_pretrained(device_map=)", kwargs["device_map"], placed, "CUDA placement; the Apple GPU"
            )
            kwargs = {**kwargs, "device_map": placed}
        return wrapped(*args, **kwargs)

    def _prepare_for_kbit(self, wrapped, instance, args, kwargs):
        model = kwargs.get("model", args[0] if args else None)
        if is_quantized(model):
            return wrapped(*args, **kwargs)
        self.runtime.report.change(
            "prepare_model_for_kbit_training", "cast all weights to float32", "freeze only",
            "the model is not quantized (bitsandbytes does not run here): casting it all to fp32 would double memory",
        )
        for parameter in model.parameters():
            parameter.requires_grad = False
        use_checkpointing = kwargs.get("use_gradient_checkpointing", args[1] if len(args) > 1 else True)
        if use_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.enable_input_require_grads()
            model.gradient_checkpointing_enable()
        return model


PATCH = PeftLoadingPatch
