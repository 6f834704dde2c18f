"""What the shim does around a Trainer's steps so that mixed precision on the Apple GPU trains and never corrupts
weights: fp32 trainable weights, the shim's loss scaler as accelerate's scaler, the non-finite loss guard with its
fall-back, the loss scale in the logs, and no save of non-finite weights.

Why fp32 trainables: peft 0.7.1 gives LoRA the base dtype and no peft version upcasts `modules_to_save`; half-precision
gradients break loss scaling ("Attempting to unscale FP16 gradients") and round small updates away.
"""
from __future__ import annotations

from mps_shim.models import trainable_parameters, upcast_trainable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

NON_FINITE_LIMIT = 3  # consecutive non-finite losses before the precision falls back


class PrecisionGuard:
    def __init__(self, runtime: Any):
        self.runtime = runtime
        self.non_finite_in_a_row = 0

    def prepare_model(self, model: Any) -> None:
        """Before the Trainer (and its optimizer) exist: trainable weights in fp32, the model on the device."""
        runtime = self.runtime
        runtime.precision.current()
        changed = upcast_trainable(model)
        if changed:
            before = ", ".join(f"{count} {dtype}" for dtype, count in sorted(changed.items()))
            runtime.report.change(
                "trainable parameters", before, "float32",
                "half-precision trainable weights break loss scaling (Attempting to unscale FP16 gradients) "
                "and round small updates away",
            )
        runtime.place(model)

    def install_scaler(self, trainer: Any) -> None:
        """The shim's loss scaler (fp16: dynamic; bf16/fp32: scale 1, the non-finite step guard only) as
        `accelerator.scaler`, so the Trainer's own loop scales, unscales before clipping and skips overflowed steps."""
        from mps_shim.scaling import DynamicLossScaler

        runtime = self.runtime
        precision = runtime.precision
        plan = precision.plan
        scaler = DynamicLossScaler(dynamic=plan.loss_scaling, on_skip=lambda scale: self._skipped(trainer, scale))
        trainer.accelerator.scaler = scaler
        precision.loss_scaler = scaler
        runtime.report.change(
            "Accelerator.scaler", None,
            "mps-shim dynamic loss scaler" if plan.loss_scaling else "mps-shim step guard (scale 1)",
            "fp16 needs loss scaling that works on every accelerate and torch version" if plan.loss_scaling
            else "a step with non-finite gradients is skipped instead of applied",
        )

    def _skipped(self, trainer: Any, scale: float) -> None:
        self.runtime.report.event(
            "overflow_skipped", f"non-finite gradients: optimizer step skipped, loss scale now {scale:g}",
            step=trainer.state.global_step,
        )

    def check_loss(self, trainer: Any, result: Any) -> None:
        """A training loss that is not finite is counted; after NON_FINITE_LIMIT in a row the run moves to a safer
        precision in place."""
        import torch

        loss = result[0] if isinstance(result, tuple) else result
        if bool(torch.isfinite(loss.detach()).all()):
            self.non_finite_in_a_row = 0
            return
        self.non_finite_in_a_row += 1
        step = trainer.state.global_step
        precision = self.runtime.precision
        self.runtime.report.event("non_finite_loss", f"loss {loss.item()} in {precision.plan.chosen}", step)
        if self.non_finite_in_a_row >= NON_FINITE_LIMIT:
            self.non_finite_in_a_row = 0
            precision.fall_back(trainer.model, step)

    def add_to_logs(self, logs: dict) -> None:
        scaler = self.runtime.precision.loss_scaler
        if scaler is not None and scaler.dynamic:
            logs["loss_scale"] = scaler.get_scale()

    def check_save(self, trainer: Any) -> None:
        import torch

        broken = [p for p in trainable_parameters(trainer.model) if not bool(torch.isfinite(p.detach()).all())]
        if broken:
            raise RuntimeError(
                f"mps-shim: not saving: {len(broken)} trainable tensors hold non-finite values; the last finite "
                "checkpoint is kept"
            )
