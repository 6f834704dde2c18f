"""Trainer: keeps old calls working everywhere; on an Apple GPU runs the plan's mixed precision and guards memory.

Corrects:
- `Trainer(tokenizer=...)`, removed in transformers 5.0 (TypeError; `processing_class` since 4.46): renamed, on every
  machine.
On an Apple GPU (real or simulated), where patches/training_args.py took bf16/fp16 away from transformers/accelerate:
- precision (shim/precision_guard.py): fp32 trainable weights before the optimizer exists, the shim's loss scaler as
  `accelerator.scaler`, the forward of training and evaluation under the plan's autocast
  (`autocast_smart_context_manager`, which every version 4.40-5.x enters around compute_loss and prediction_step),
  the non-finite loss guard, no save of non-finite weights.
- memory (shim/memory_guard.py): an oversized run swaps the machine or dies and nothing in the stack recovers
  (accelerate recognises the MPS out-of-memory text only from 1.15; `auto_find_batch_size` restarts from step 0 with
  a smaller effective batch): the preflight plans the split of each batch before training, steps run in pieces that
  fit, an out-of-memory is recovered in place, memory figures go into the logs.
- long runs: batches padded on the right where left padding makes MPS attention return NaN (shim/padding.py), each
  batch padded to one of a few lengths (shim/shapes.py: MPS keeps a compiled graph per shape), tokens
  per second in the logs and a warning when they fall and stay down (shim/throughput.py).
`mps-shim plan` stops where training would start (Runtime.reach_training).
Versions: transformers 4.40-5.x (training_step with and without num_items_in_batch).
"""
from __future__ import annotations

import inspect

from mps_shim import shapes, throughput
from mps_shim.chunking import inputs_and_caller
from mps_shim.errors import MemoryPlanError
from mps_shim.memory_guard import STATE, MemoryGuard
from mps_shim.padding import pad_trainer_right
from mps_shim.precision_guard import PrecisionGuard
from mps_shim.registry import Patch


class TrainerPatch(Patch):
    target = "transformers.trainer"
    distribution = "transformers"
    supported = ">=4.40,<6"
    corrects = "Trainer(tokenizer=) gone in 5.0; AMP, loss scaling, fp32 trainables and memory the shim owns on MPS"

    def apply(self, module) -> None:
        trainer = module.Trainer
        self.takes_tokenizer = "tokenizer" in inspect.signature(trainer.__init__).parameters
        self.precision = PrecisionGuard(self.runtime)
        self.wrap(trainer, "__init__", self._init)
        self.wrap(trainer, "train", self._train)
        if self.runtime.changes_numbers:
            self.wrap(trainer, "create_accelerator_and_postprocess", self._create_accelerator)
            self.wrap(trainer, "autocast_smart_context_manager", self._autocast)
            self.wrap(trainer, "training_step", self._training_step)
            self.wrap(trainer, "compute_loss", self._compute_loss)
            self.wrap(trainer, "prediction_step", self._prediction_step)
            self.wrap(trainer, "evaluate", self._evaluate)
            self.wrap(trainer, "log", self._log)
            self.wrap(trainer, "save_model", self._save_model)
            if self.runtime.plan_only:
                self.wrap(trainer, "_move_model_to_device", self._move_model_to_device)

    def _init(self, wrapped, trainer, args, kwargs):
        if "tokenizer" in kwargs and not self.takes_tokenizer:
            kwargs = dict(kwargs)
            kwargs["processing_class"] = kwargs.pop("tokenizer")
            self.runtime.report.change(
                "Trainer(tokenizer=)", "tokenizer", "processing_class", "renamed in transformers 4.46, removed in 5.0"
            )
        model = kwargs.get("model", args[0] if args else None)
        if model is not None and self.runtime.changes_numbers:
            self.precision.prepare_model(model)
        return wrapped(*args, **kwargs)

    def _move_model_to_device(self, wrapped, trainer, args, kwargs):
        """`mps-shim plan` of a model built without weights (patches/modeling.py): nothing to move, and a meta tensor
        cannot be copied; the preflight sizes it where it is."""
        model = kwargs.get("model", args[0] if args else None)
        if model is not None and any(parameter.is_meta for parameter in model.parameters()):
            return None
        return wrapped(*args, **kwargs)

    def _train(self, wrapped, trainer, args, kwargs):
        runtime = self.runtime
        memory = MemoryGuard.of(runtime, trainer) if runtime.changes_numbers else None
        if memory is not None:
            pad_trainer_right(trainer, runtime)  # before the collator is bucketed: no fully masked attention rows
        restore = shapes.install(runtime, trainer) if memory is not None else None
        try:
            if memory is not None:
                try:
                    memory.before_train(trainer)  # may change the model (the memory ladder)
                except MemoryPlanError:
                    runtime.reach_training(fits=False)  # `mps-shim plan` prints the plan with the diagnosis
                    raise
            runtime.reach_training()  # `mps-shim plan` prints the plan and stops here
            return wrapped(*args, **kwargs)
        finally:
            if memory is not None:
                memory.after_train()
                restore()
                throughput.of(runtime, trainer).end(trainer.state.global_step)

    def _create_accelerator(self, wrapped, trainer, args, kwargs):
        result = wrapped(*args, **kwargs)
        self.precision.install_scaler(trainer)
        return result

    def _autocast(self, wrapped, trainer, args, kwargs):
        precision = self.runtime.precision
        if precision.plan.autocast_dtype is None:
            return wrapped(*args, **kwargs)
        return precision.autocast()

    def _training_step(self, wrapped, trainer, args, kwargs):
        inputs, call = inputs_and_caller(wrapped, args, kwargs)
        throughput.of(self.runtime, trainer).step_started(inputs, trainer.state.global_step)
        return MemoryGuard.of(self.runtime, trainer).training_step(trainer, call, inputs)

    def _compute_loss(self, wrapped, trainer, args, kwargs):
        result = wrapped(*args, **kwargs)
        if not trainer.model.training:
            return result
        self.precision.check_loss(trainer, result)
        num_items = kwargs.get("num_items_in_batch", args[3] if len(args) > 3 else None)
        return MemoryGuard.of(self.runtime, trainer).weight_loss(trainer, result, num_items)

    def _prediction_step(self, wrapped, trainer, args, kwargs):
        inputs, call = inputs_and_caller(wrapped, args, kwargs)
        return MemoryGuard.of(self.runtime, trainer).prediction_step(trainer, call, inputs)

    def _evaluate(self, wrapped, trainer, args, kwargs):
        try:
            with throughput.of(self.runtime, trainer).paused():
                return wrapped(*args, **kwargs)
        finally:
            memory = getattr(trainer, STATE, None)
            if memory is not None:
                memory.after_evaluate()

    def _log(self, wrapped, trainer, args, kwargs):
        logs = kwargs.get("logs", args[0] if args else None)
        if isinstance(logs, dict) and "loss" in logs:
            MemoryGuard.of(self.runtime, trainer).add_to_logs(trainer, logs)
            self.precision.add_to_logs(logs)
            throughput.of(self.runtime, trainer).add_to_logs(logs, trainer.state.global_step)
        return wrapped(*args, **kwargs)

    def _save_model(self, wrapped, trainer, args, kwargs):
        self.precision.check_save(trainer)
        with throughput.of(self.runtime, trainer).paused():
            return wrapped(*args, **kwargs)


PATCH = TrainerPatch
