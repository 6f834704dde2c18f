"""Accelerator.unscale_gradients: gradients are unscaled by the shim's loss scaler before clipping.

Corrects: accelerate unscales before `clip_grad_norm_` only when it runs fp16 itself (`native_amp and
mixed_precision == "fp16"`), which on MPS it refuses (0.30-1.10) or is never asked to (the shim runs mixed precision,
patches/training_args.py). Without this, gradients would be clipped while still multiplied by the loss scale.
Versions: accelerate 0.30-1.15.
"""
from __future__ import annotations

from mps_shim.registry import Patch
from mps_shim.scaling import DynamicLossScaler


class UnscaleGradientsPatch(Patch):
    target = "accelerate.accelerator"
    distribution = "accelerate"
    supported = ">=0.27,<2"
    corrects = "no unscaling before clipping when accelerate does not run fp16 itself"
    mac_only = True

    def apply(self, module) -> None:
        self.wrap(module.Accelerator, "unscale_gradients", self._unscale_gradients)

    def _unscale_gradients(self, wrapped, accelerator, args, kwargs):
        scaler = accelerator.scaler
        if not isinstance(scaler, DynamicLossScaler):
            return wrapped(*args, **kwargs)
        optimizer = kwargs.get("optimizer", args[0] if args else None)
        optimizers = accelerator._optimizers if optimizer is None else optimizer
        for each in optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]:
            scaler.unscale_(getattr(each, "optimizer", each))  # AcceleratedOptimizer wraps the torch one
        return None


PATCH = UnscaleGradientsPatch
