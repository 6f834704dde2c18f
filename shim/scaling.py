"""Dynamic loss scaling and the non-finite step guard the shim runs on the Apple GPU.

Why our own instead of torch.amp.GradScaler: GradScaler("mps") fails in unscale_ before torch 2.8 (float64, matrix
C(c)), accelerate refuses fp16 on MPS from 0.30 to 1.10, and fused Adam/AdamW before torch 2.13 ignore the inf flags
GradScaler hands them. This scaler unscales and checks gradients with plain tensor ops and simply does not call
`optimizer.step()` when a gradient is not finite, which works the same on every torch and accelerate version.

It speaks the part of GradScaler's interface that accelerate uses (`scale`, `unscale_`, `step`, `update`,
`get_scale`, `state_dict`, `load_state_dict`), so installed as `accelerator.scaler` the Trainer's own loop does the
rest: `accelerator.backward` scales, `clip_grad_norm_` unscales first, a skipped step leaves the learning-rate
schedule where it was (`optimizer_step_was_skipped`). With `dynamic=False` the scale stays 1.0 and only the guard
remains: bf16 and fp32 runs also never apply a non-finite update.
"""
from __future__ import annotations


class DynamicLossScaler:
    def __init__(
        self,
        dynamic: bool = True,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        on_skip=None,
    ):
        self.dynamic = dynamic
        self.scale_value = init_scale if dynamic else 1.0
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.on_skip = on_skip  # called with the scale after each skipped step
        self.growth_tracker = 0
        self.skipped_steps = 0
        self._unscaled: dict[int, bool] = {}  # id(optimizer) -> whether a gradient was not finite

    def is_enabled(self) -> bool:
        return True

    def get_scale(self) -> float:
        return self.scale_value

    def scale(self, loss):
        return loss * self.scale_value if self.scale_value != 1.0 else loss

    def unscale_(self, optimizer) -> None:
        """Divide the gradients by the scale (once per step) and remember whether any was not finite."""
        import torch

        if id(optimizer) in self._unscaled:
            return
        gradients = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        found_inf = False
        if gradients:
            inverse = 1.0 / self.scale_value
            flags = []
            for gradient in gradients:
                if inverse != 1.0:
                    gradient.mul_(inverse)
                flags.append(torch.isfinite(gradient).all())
            found_inf = not bool(torch.stack(flags).all().item())  # one device sync per step
        self._unscaled[id(optimizer)] = found_inf

    def step(self, optimizer, closure=None):
        self.unscale_(optimizer)
        if self._unscaled[id(optimizer)]:
            return None
        return optimizer.step() if closure is None else optimizer.step(closure)

    def update(self) -> None:
        found_inf = any(self._unscaled.values())
        self._unscaled.clear()
        if found_inf:
            self.skipped_steps += 1
            if self.dynamic:
                self.scale_value *= self.backoff_factor
            self.growth_tracker = 0
            if self.on_skip is not None:
                self.on_skip(self.scale_value)
            return
        self.growth_tracker += 1
        if self.dynamic and self.growth_tracker >= self.growth_interval:
            self.scale_value *= self.growth_factor
            self.growth_tracker = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale_value, "growth_tracker": self.growth_tracker, "dynamic": self.dynamic}

    def load_state_dict(self, state: dict) -> None:
        self.scale_value = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
