"""The memory of one Trainer on the Apple GPU: its plan (shim/preflight.py), the split of each batch inside a training
or evaluation step, recovery from out-of-memory, when to give cached memory back, and memory in the logs.

Splitting happens inside Trainer.training_step: the dataloader, the accumulation steps, the optimizer, the scheduler
and the step count never see it. Each piece's loss is weighted by its share of the batch's label tokens (the
per-batch mean of transformers 4.40 and of models without loss kwargs), or left as is when the Trainer already
normalised it by `num_items_in_batch` (5.x), so the summed gradients are the unsplit batch's.

Recovery: an out-of-memory in a step empties the caches and re-runs the same rows split finer, remembered for the next
batches; one `oom_recovered` event each. A backward that failed half-way has already added the piece's full gradient
to the parameters it reached (autograd accumulates each leaf once per backward, after its gradient is complete):
those parameters are recorded by a post-accumulate hook and excluded from the re-run of those rows (their gradient is
set aside during the re-run and put back), so no sample counts twice and none is lost, without copying any gradient.
"""
from __future__ import annotations

import math

from mps_shim.cache_policy import IDLE, release_reason
from mps_shim.chunking import (
    Piece, batch_rows, combine_predictions, pieces, run_in_chunks, share_of_batch, slice_inputs, token_counts,
)
from mps_shim.device_memory import DeviceMemory, PressureWatch
from mps_shim.fit import split_for, usable
from mps_shim.log import INFO
from mps_shim.models import enable_checkpointing, is_checkpointing, trainable_parameters
from mps_shim.preflight import HEADROOM, Preflight
from mps_shim.units import MIB

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

STATE = "_mps_shim_memory"  # the attribute of a Trainer that holds its MemoryGuard
RELEASE_EVENTS = 10  # cache releases reported one by one; later ones are only counted


class MemoryGuard:
    def __init__(self, runtime: Any, device: DeviceMemory):
        self.runtime = runtime
        self.device = device
        self.budget = device.budget
        self.usable = usable(self.budget, HEADROOM) if self.budget else None
        self.micro_batch: int | None = None  # largest piece of a training batch; None = unsplit
        self.eval_micro_batch: int | None = None
        self.weight: float | None = None  # loss weight of the piece running now (None: not splitting)
        self.touched: set = set()
        self.hooks: list = []
        self.watch = PressureWatch()
        self.cache_empties = 0
        self.cache_released = 0  # bytes the policy's releases gave back
        self.floor = 0  # driver - allocated right after the last release: what a release cannot give back
        self.releases = 0
        self.steps_since_idle_release: int | None = None  # training steps since the last release for an idle cache

    @classmethod
    def of(cls, runtime: Any, trainer: Any) -> MemoryGuard:
        """The trainer's guard, made on first use (evaluate() may come without train())."""
        guard = getattr(trainer, STATE, None)
        if guard is None:
            import torch

            guard = cls(runtime, DeviceMemory(runtime, torch))
            setattr(trainer, STATE, guard)
        return guard

    # -- around train() ----------------------------------------------------------------------------------------------

    def before_train(self, trainer: Any) -> None:
        """The preflight (may change the model, or raise MemoryPlanError), then the gradient hooks recovery needs."""
        self.micro_batch = Preflight(self.runtime, trainer, self.device, self.budget, self.usable).run()
        touched = self.touched
        for parameter in trainable_parameters(trainer.model):
            if hasattr(parameter, "register_post_accumulate_grad_hook"):  # torch >= 2.1
                self.hooks.append(parameter.register_post_accumulate_grad_hook(touched.add))
            else:  # the gradient is complete when this runs; accumulating it allocates nothing
                self.hooks.append(parameter.register_hook(lambda grad, p=parameter: touched.add(p)))

    def after_train(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
        if self.runtime.simulator is None:
            self.runtime.report.update("memory", {"measured_peak_bytes": self.device.peak()})

    # -- a training step ----------------------------------------------------------------------------------------------

    def training_step(self, trainer: Any, call: Callable, inputs: Any) -> Any:
        """Trainer.training_step for `inputs`, in pieces when the batch does not fit; the summed loss."""
        rows = batch_rows(inputs)
        if not self.hooks or rows is None:
            with self.device.device_work():
                return call(inputs)
        counts, total_tokens = token_counts(inputs) if rows > (self.micro_batch or rows) else ([], 0)

        def run(piece: Piece) -> Any:
            nonlocal counts, total_tokens
            whole = piece.rows == rows
            if not whole and not counts:  # the batch was meant to run whole; a recovery split it
                counts, total_tokens = token_counts(inputs)
            weight = None if whole else share_of_batch(piece, counts, total_tokens, rows)
            if weight == 0:
                return None  # rows whose labels are all ignored add nothing to the loss or the gradients
            set_aside = [(p, p.grad) for p in piece.excluded]
            for parameter, _ in set_aside:
                parameter.grad = None
            self.touched.clear()
            self.weight = weight
            try:
                with self.device.device_work():
                    return call(inputs if whole else slice_inputs(inputs, piece.start, piece.stop, rows))
            finally:
                self.weight = None
                for parameter, grad in set_aside:  # what this run added for them was counted before
                    parameter.grad = grad

        def recover(piece: Piece, failure: str, pending: list[Piece]) -> list[Piece]:
            return self._recover_training(trainer, piece, failure, pending, rows)

        results = run_in_chunks(rows, self.micro_batch or rows, run, recover)
        self._release_cache_if_idle(trainer)
        if not results:
            import torch

            return torch.zeros((), device=trainer.args.device)
        total = results[0][1]
        for _, out in results[1:]:
            total = total + out
        return total

    def _recover_training(self, trainer: Any, piece: Piece, failure: str, pending: list[Piece], rows: int) -> list:
        done = frozenset(piece.excluded | self.touched)
        self.touched.clear()
        self._empty_cache()
        step = trainer.state.global_step
        report = self.runtime.report
        if piece.rows == 1:
            model = trainer.model
            if is_checkpointing(model):
                raise RuntimeError(
                    f"mps-shim: out of memory on a single sequence even with gradient checkpointing at step {step}: "
                    f"{failure}"
                )
            enable_checkpointing(model)
            report.change(
                "gradient checkpointing", False, True,
                "out of memory on a single sequence during training: activations are recomputed in backward",
            )
            report.event("oom_recovered", f"training step: {failure} -> re-ran 1 sequence with gradient checkpointing",
                         step=step)
            return [Piece(piece.start, piece.stop, done), *pending]
        half = math.ceil(piece.rows / 2)
        self.micro_batch = min(self.micro_batch or rows, half)
        split = split_for(int(trainer.args.per_device_train_batch_size), self.micro_batch)
        report.update("batch", {"micro_batch": split.micro_batch, "chunks_per_batch": split.chunks})
        report.event(
            "oom_recovered",
            f"training step: {failure} -> re-ran {piece.rows} sequences as {half} + {piece.rows - half}; batches are "
            f"now split into chunks of at most {self.micro_batch}",
            step=step,
        )
        # Rows still waiting in bigger pieces would run out of memory the same way: split them now.
        waiting = [Piece(piece.start, piece.start + half, done), Piece(piece.start + half, piece.stop, done), *pending]
        return [
            smaller for each in waiting
            for smaller in pieces(each.start, each.rows, self.micro_batch, each.excluded)
        ]

    def weight_loss(self, trainer: Any, result: Any, num_items: Any) -> Any:
        """compute_loss's result for the piece running now, weighted by its share of the batch."""
        weight = self.weight
        if weight is None or loss_scaled_for_accumulation(trainer, num_items):
            return result  # whole, or a sum over the piece divided by the window's item count: it adds up already
        if isinstance(result, tuple):
            return (result[0] * weight, *result[1:])
        return result * weight

    # -- an evaluation step -----------------------------------------------------------------------------------------

    def prediction_step(self, trainer: Any, call: Callable, inputs: Any) -> Any:
        rows = batch_rows(inputs)
        if rows is None:
            with self.device.device_work():
                return call(inputs)

        def run(piece: Piece) -> Any:
            with self.device.device_work():
                return call(inputs if piece.rows == rows else slice_inputs(inputs, piece.start, piece.stop, rows))

        def recover(piece: Piece, failure: str, pending: list[Piece]) -> list[Piece]:
            self._empty_cache()
            half = math.ceil(piece.rows / 2)
            self.eval_micro_batch = min(self.eval_micro_batch or rows, half)
            self.runtime.report.event(
                "oom_recovered",
                f"evaluation step: {failure} -> re-ran {piece.rows} sequences as {half} + {piece.rows - half}; "
                f"evaluation batches are now split into chunks of at most {self.eval_micro_batch}",
                step=trainer.state.global_step,
            )
            return [Piece(piece.start, piece.start + half), Piece(piece.start + half, piece.stop), *pending]

        results = run_in_chunks(rows, self.eval_micro_batch or rows, run, recover, retry_single_rows=False)
        if len(results) == 1:
            return results[0][1]
        return combine_predictions(results, token_counts(inputs)[0], rows)

    def after_evaluate(self) -> None:
        self._empty_cache()  # evaluation's shapes are not training's: give the cache back once

    # -- the cache and the logs --------------------------------------------------------------------------------------

    def _empty_cache(self) -> None:
        self.device.empty_cache()
        self.cache_empties += 1

    def _release_cache_if_idle(self, trainer: Any) -> None:
        """Two queries per step; empty the cache as shim/cache_policy.py decides, with what it gave back."""
        device = self.device
        allocated, driver = device.allocated(), device.driver()
        since = self.steps_since_idle_release
        self.steps_since_idle_release = since = None if since is None else since + 1
        decision = release_reason(allocated, driver, self.floor, self.usable, since)
        if decision is None:
            return
        kind, why = decision
        if kind == IDLE:
            self.steps_since_idle_release = 0
        self._empty_cache()
        after_allocated, after = device.allocated(), device.driver()
        self.floor = max(0, after - after_allocated)
        freed = max(0, driver - after)
        self.cache_released += freed
        self.releases += 1
        if self.releases > RELEASE_EVENTS:
            return  # the total stays in the report's memory section (add_to_logs)
        last = self.releases == RELEASE_EVENTS
        more = "; further releases are only counted (memory.cache_released_bytes)" if last else ""
        self.runtime.report.event(
            "cache_released", f"{why}: emptied the cache, {freed / MIB:.1f} MiB given back "
            f"({driver / MIB:.1f} -> {after / MIB:.1f} MiB; live tensors {after_allocated / MIB:.1f} MiB){more}",
            step=trainer.state.global_step, level=INFO,
        )

    def add_to_logs(self, trainer: Any, logs: dict) -> None:
        device = self.device
        device.sample()
        logs["memory/allocated_mib"] = round(device.allocated() / MIB, 2)
        logs["memory/driver_mib"] = round(device.driver() / MIB, 2)
        if self.budget:
            logs["memory/budget_mib"] = round(self.budget / MIB, 2)
        logs["memory/peak_mib"] = round(device.peak() / MIB, 2)
        warning = self.watch.check()
        if warning:
            self.runtime.report.event("memory_pressure", warning, step=trainer.state.global_step)
        self.runtime.report.update("memory", {"cache_empties": self.cache_empties,
                                              "cache_released_bytes": self.cache_released})


def loss_scaled_for_accumulation(trainer: Any, num_items: Any) -> bool:
    """transformers 5.x's own rule (Trainer.training_step): the loss is already normalised over the accumulation
    window when the model took `num_items_in_batch` or a compute_loss_func did; 4.40 has no such path."""
    explicit = getattr(trainer, "loss_is_scaled_for_ga", None)
    if explicit is not None:
        return bool(explicit)
    return bool(
        (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items is not None)
        or getattr(trainer, "compute_loss_func", None) is not None
    )
