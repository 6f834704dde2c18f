"""Trainer: runs the plan's mixed precision, guards every step against non-finite values, keeps old calls working.

Corrects:
- `Trainer(tokenizer=...)`, removed in transformers 5.0 (TypeError; `processing_class` since 4.46): renamed, on every
  machine.
On an Apple GPU (real or simulated), where patches/training_args.py took bf16/fp16 away from transformers/accelerate:
- autocast: the forward of training and evaluation runs under the plan's autocast (`autocast_smart_context_manager`,
  which every version 4.40-5.x enters around compute_loss and prediction_step).
- loss scaling: the shim's DynamicLossScaler becomes `accelerator.scaler` (fp16: dynamic; bf16/fp32: scale 1, guard
  only), so an overflowed step is skipped without advancing the learning-rate schedule, on accelerate 0.30-1.15 alike.
- trainable parameters in fp16/bf16 (peft 0.7.1 gives LoRA the base dtype; no peft version upcasts
  `modules_to_save`): made fp32 before the optimizer exists, so the scaler never meets half-precision gradients
  ("Attempting to unscale FP16 gradients") and small updates are not rounded away.
- a non-finite loss from the forward pass: after three in a row the run moves to a safer precision (fp16 -> bf16 where
  the device has it -> fp32) in place, keeping optimizer state and step count; a save with non-finite trainable
  weights is refused.
Versions: transformers 4.40-5.x.
"""
from __future__ import annotations

import os
import sys

from mps_shim.config import PLAN_ONLY
from mps_shim.registry import Patch

NON_FINITE_LIMIT = 3  # consecutive non-finite losses before the precision falls back


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


def upcast_trainable(model) -> dict[str, int]:
    """Make every trainable floating-point parameter fp32 in place; {old dtype: count} of what changed."""
    import torch

    changed: dict[str, int] = {}
    for parameter in trainable_parameters(model):
        if parameter.is_floating_point() and parameter.dtype != torch.float32:
            name = str(parameter.dtype).replace("torch.", "")
            changed[name] = changed.get(name, 0) + 1
            parameter.data = parameter.data.float()
    return changed


class TrainerPatch(Patch):
    target = "transformers.trainer"
    distribution = "transformers"
    supported = ">=4.40,<6"
    corrects = "Trainer(tokenizer=) gone in 5.0; AMP, loss scaling and fp32 trainables the shim owns on MPS"

    def apply(self, module) -> None:
        import inspect

        trainer = module.Trainer
        self.takes_tokenizer = "tokenizer" in inspect.signature(trainer.__init__).parameters
        self.wrap(trainer, "__init__", self._init)
        self.wrap(trainer, "train", self._train)
        if self.runtime.changes_numbers:
            self.wrap(trainer, "create_accelerator_and_postprocess", self._create_accelerator)
            self.wrap(trainer, "autocast_smart_context_manager", self._autocast)
            self.wrap(trainer, "compute_loss", self._compute_loss)
            self.wrap(trainer, "log", self._log)
            self.wrap(trainer, "save_model", self._save_model)
        self.non_finite_in_a_row = 0

    def _init(self, wrapped, trainer, args, kwargs):
        if "tokenizer" in kwargs and not self.takes_tokenizer:
            kwargs = dict(kwargs)
            kwargs["processing_class"] = kwargs.pop("tokenizer")
            self.runtime.report.change(
                "Trainer(tokenizer=)", "tokenizer", "processing_class", "renamed in transformers 4.46, removed in 5.0"
            )
        model = kwargs.get("model", args[0] if args else None)
        if model is not None and self.runtime.changes_numbers:
            self._prepare_model(model)
        return wrapped(*args, **kwargs)

    def _prepare_model(self, model) -> None:
        runtime = self.runtime
        if runtime.precision is None:
            runtime.decide_precision()
        changed = upcast_trainable(model)
        if changed:
            before = ", ".join(f"{count} {dtype}" for dtype, count in sorted(changed.items()))
            runtime.report.change(
                "trainable parameters", before, "float32",
                "half-precision trainable weights break loss scaling (Attempting to unscale FP16 gradients) "
                "and round small updates away",
            )
        runtime.place(model)

    def _create_accelerator(self, wrapped, trainer, args, kwargs):
        from mps_shim.scaling import DynamicLossScaler

        result = wrapped(*args, **kwargs)
        plan = self.runtime.precision
        scaler = DynamicLossScaler(dynamic=plan.loss_scaling, on_skip=lambda scale: self._skipped(trainer, scale))
        trainer.accelerator.scaler = scaler
        self.runtime.loss_scaler = scaler
        self.runtime.report.change(
            "Accelerator.scaler", None,
            "mps-shim dynamic loss scaler" if plan.loss_scaling else "mps-shim step guard (scale 1)",
            "fp16 needs loss scaling that works on every accelerate and torch version" if plan.loss_scaling
            else "a step with non-finite gradients is skipped instead of applied",
        )
        return result

    def _skipped(self, trainer, scale: float) -> None:
        self.runtime.report.event(
            "overflow_skipped", f"non-finite gradients: optimizer step skipped, loss scale now {scale:g}",
            step=trainer.state.global_step,
        )

    def _autocast(self, wrapped, trainer, args, kwargs):
        if self.runtime.precision.autocast_dtype is None:
            return wrapped(*args, **kwargs)
        return self.runtime.autocast()

    def _compute_loss(self, wrapped, trainer, args, kwargs):
        import torch

        result = wrapped(*args, **kwargs)
        if not trainer.model.training:
            return result
        loss = result[0] if isinstance(result, tuple) else result
        if bool(torch.isfinite(loss.detach()).all()):
            self.non_finite_in_a_row = 0
            return result
        self.non_finite_in_a_row += 1
        step = trainer.state.global_step
        self.runtime.report.event("non_finite_loss", f"loss {loss.item()} in {self.runtime.precision.chosen}", step)
        if self.non_finite_in_a_row >= NON_FINITE_LIMIT:
            self.non_finite_in_a_row = 0
            self.runtime.fall_back_precision(trainer.model, step)
        return result

    def _log(self, wrapped, trainer, args, kwargs):
        logs = kwargs.get("logs", args[0] if args else None)
        scaler = self.runtime.loss_scaler
        if isinstance(logs, dict) and "loss" in logs and scaler is not None and scaler.dynamic:
            logs["loss_scale"] = scaler.get_scale()
        return wrapped(*args, **kwargs)

    def _save_model(self, wrapped, trainer, args, kwargs):
        import torch

        broken = [p for p in trainable_parameters(trainer.model) if not bool(torch.isfinite(p.detach()).all())]
        if broken:
            raise RuntimeError(
                f"mps-shim: not saving: {len(broken)} trainable tensors hold non-finite values; the last finite "
                "checkpoint is kept"
            )
        return wrapped(*args, **kwargs)

    def _train(self, wrapped, trainer, args, kwargs):
        if os.environ.get(PLAN_ONLY):
            from mps_shim.report import render_plan

            print(render_plan(self.runtime.report.data))
            self.runtime.report.worth_writing = True
            self.runtime.report.write()
            sys.exit(0)
        return wrapped(*args, **kwargs)


PATCH = TrainerPatch
