"""Trainer memory (issue 5): a preflight that plans the split of each batch, exact splitting, out-of-memory recovery,
and memory in the logs.

Corrects, on an Apple GPU (real or simulated), where an oversized run swaps the machine or dies and nothing in the
stack recovers (accelerate recognises the MPS out-of-memory text only from 1.15; `auto_find_batch_size` restarts from
step 0 with a smaller effective batch, matrix B3-B5):
- preflight, before Trainer.train's body (and so before `mps-shim plan` prints the plan): the peak is estimated from
  the model (shim/memory.py), calibrated by one real forward/backward on a synthetic batch of the longest sequence the
  data can produce, and each per-device batch is split into the fewest chunks that fit the budget with headroom. If
  one sample does not fit: gradient checkpointing, then frozen weights in the autocast dtype (only if the precision
  plan computes in it), else the run stops before training with one diagnosis.
- splitting inside Trainer.training_step: the dataloader, the accumulation steps, the optimizer, the scheduler and
  the step count never see it. Each chunk's loss is weighted by its share of the batch's label tokens (the per-batch
  mean of 4.40 and of models without loss kwargs), or left as is when the Trainer already normalised it by
  `num_items_in_batch` (5.x), so the summed gradients are the unsplit batch's.
- recovery: an out-of-memory in a training or evaluation step (shim/memory.is_out_of_memory) empties the caches and
  re-runs the same rows split finer, remembered for the next batches; one `oom_recovered` event each. A backward that
  failed half-way has already added the chunk's full gradient to the parameters it reached (autograd accumulates each
  leaf once per backward, after its gradient is complete): those parameters are recorded by a post-accumulate hook
  and excluded from the re-run of those rows (their gradient is set aside during the re-run and put back), so no
  sample counts twice and none is lost, without copying any gradient in the common case.
- watch: memory/allocated_mib, memory/driver_mib, memory/budget_mib (and memory/peak_mib) in every training log; a
  warning when the machine starts swapping; the cache is emptied only after a recovery, after evaluation, and when the
  driver's total passes the usable budget.
Versions: transformers 4.40-5.x (training_step with and without num_items_in_batch).
"""
from __future__ import annotations

import logging
import math
import os
import sys

from mps_shim.config import PLAN_ONLY
from mps_shim.memory import (
    CHECKPOINTING,
    FROZEN_DTYPE,
    MIB,
    Calibration,
    DeviceMemory,
    PressureWatch,
    activation_bytes,
    choose_split,
    chunk_sizes,
    config_of,
    diagnosis,
    estimate_peak,
    fitting_sequence,
    is_checkpointing,
    is_out_of_memory,
    label_tokens,
    model_facts,
    next_rung,
    split_for,
    usable,
)
from mps_shim.patches.trainer import trainable_parameters
from mps_shim.registry import Patch

HEADROOM = 0.10  # of the budget, kept free: MPS heap alignment, MPSGraph scratch, fragmentation
STATE = "_mps_shim_memory"

log = logging.getLogger("mps_shim")


class MemoryPlanError(SystemExit):
    """The run cannot fit in memory: raised before training, with the diagnosis as the exit message."""


class _State:
    """Per-Trainer memory state."""

    def __init__(self, device: DeviceMemory, budget: int | None):
        self.device = device
        self.budget = budget
        self.usable = usable(budget, HEADROOM) if budget else None
        self.micro_batch: int | None = None  # largest chunk of a training batch; None = unsplit
        self.eval_micro_batch: int | None = None
        self.weight = None  # loss weight of the chunk running now (None: not splitting)
        self.touched: set = set()
        self.hooks: list = []
        self.watch = PressureWatch()
        self.cache_empties = 0
        self.recoveries = 0
        self.log_peak = 0


class _Piece:
    __slots__ = ("start", "stop", "excluded")

    def __init__(self, start: int, stop: int, excluded: frozenset = frozenset()):
        self.start, self.stop, self.excluded = start, stop, excluded

    @property
    def rows(self) -> int:
        return self.stop - self.start


def inputs_and_caller(wrapped, args, kwargs):
    """The `inputs` of a training_step/prediction_step call (model, inputs, ...), and a function that makes the same
    call with other inputs."""
    if "inputs" in kwargs:
        return kwargs["inputs"], lambda other: wrapped(*args, **{**kwargs, "inputs": other})
    return args[1], lambda other: wrapped(*args[:1], other, *args[2:], **kwargs)


def batch_rows(inputs) -> int | None:
    """Rows of a batch: the first dimension its tensors share."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    rows = None
    for value in inputs.values() if hasattr(inputs, "values") else ():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            if rows is None:
                rows = value.shape[0]
            elif value.shape[0] != rows:
                return None
    return rows


def slice_inputs(inputs, start: int, stop: int, rows: int):
    import torch

    return {
        key: value[start:stop] if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows
        else value
        for key, value in inputs.items()
    }


def concat_nested(parts):
    """Concatenate per-chunk outputs (tensors, tuples/lists of them, None) along the batch dimension."""
    import torch

    first = parts[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            return first
        return torch.cat(parts, dim=0)
    if isinstance(first, (tuple, list)):
        return type(first)(concat_nested([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: concat_nested([p[k] for p in parts]) for k in first}
    return first


def longest_sequence(dataset, collator=None) -> int | None:
    """The longest batch length the data can produce: the longest `input_ids`, rounded up as the collator pads."""
    if dataset is None:
        return None
    longest = None
    try:
        if "input_ids" in getattr(dataset, "column_names", ()) and hasattr(dataset, "data"):
            import pyarrow.compute as pc

            # The whole Arrow table, before any select/shuffle: at least the longest of the rows in use.
            longest = pc.max(pc.list_value_length(dataset.data.column("input_ids"))).as_py()
    except Exception:
        longest = None
    if longest is None:
        try:
            count = len(dataset)
        except TypeError:
            return None
        longest = 0
        for index in range(min(count, 20000)):
            item = dataset[index]
            ids = item.get("input_ids") if hasattr(item, "get") else None
            if ids is None:
                return None
            longest = max(longest, len(ids))
    if getattr(collator, "padding", None) == "max_length" and getattr(collator, "max_length", None):
        longest = max(longest, collator.max_length)
    multiple = getattr(collator, "pad_to_multiple_of", None)
    if multiple:
        longest = int(math.ceil(longest / multiple) * multiple)
    return int(longest) or None


class TrainerMemoryPatch(Patch):
    target = "transformers.trainer"
    distribution = "transformers"
    supported = ">=4.40,<6"
    corrects = "MPS memory: swapping instead of failing, no recovery from out-of-memory, auto_find_batch_size restarts"
    mac_only = True

    def apply(self, module) -> None:
        trainer = module.Trainer
        self.wrap(trainer, "train", self._train)
        self.wrap(trainer, "training_step", self._training_step)
        self.wrap(trainer, "compute_loss", self._compute_loss)
        self.wrap(trainer, "prediction_step", self._prediction_step)
        self.wrap(trainer, "evaluate", self._evaluate)
        self.wrap(trainer, "log", self._log)

    # -- preflight ----------------------------------------------------------------------------------------------------

    def _state(self, trainer) -> _State:
        state = getattr(trainer, STATE, None)
        if state is None:
            import torch

            device = DeviceMemory(self.runtime, torch)
            budget = device.budget
            state = _State(device, budget)
            setattr(trainer, STATE, state)
        return state

    def _train(self, wrapped, trainer, args, kwargs):
        state = self._state(trainer)
        self._preflight(trainer, state)
        self._hook_gradients(trainer, state)
        try:
            return wrapped(*args, **kwargs)
        finally:
            for handle in state.hooks:
                handle.remove()
            state.hooks.clear()
            if self.runtime.simulator is None:
                self.runtime.report.update("memory", {"measured_peak_bytes": state.device.peak()})

    def _preflight(self, trainer, state: _State) -> None:
        runtime = self.runtime
        report = runtime.report
        budget = state.budget
        model = trainer.model
        targs = trainer.args
        per_device = int(targs.per_device_train_batch_size)
        accumulation = int(targs.gradient_accumulation_steps)
        collator = getattr(trainer, "data_collator", None)
        seq = longest_sequence(getattr(trainer, "train_dataset", None), collator)
        eval_seq = longest_sequence(getattr(trainer, "eval_dataset", None), collator) or 0
        eval_batch = int(targs.per_device_eval_batch_size) if getattr(trainer, "eval_dataset", None) is not None else 0
        plan = runtime.precision
        compute_bytes = 2 if plan is not None and plan.autocast_dtype else 4
        facts = model_facts(model)
        memory = {"budget_bytes": budget, "usable_bytes": state.usable, "headroom": HEADROOM,
                  "longest_sequence": seq}
        if seq is None or facts.vocab == 0 or budget is None:
            report.update("memory", memory)
            report.note("memory preflight skipped: the longest sequence or the model's shape is unknown")
            return
        foreach = runtime.simulator is None  # AdamW's foreach kernels on a real MPS device
        tried: list[str] = []
        simulator = runtime.simulator
        earlier_peak = simulator.peak_bytes if simulator is not None else 0

        def estimate(calibration, batch, at_seq=seq):
            return estimate_peak(
                facts, batch, at_seq, compute_bytes, str(targs.optim), calibration,
                accumulates=accumulation > 1 or batch < per_device, eval_batch=eval_batch, eval_seq=eval_seq,
                foreach=foreach,
            )

        while True:
            calibration, failed = self._calibrate(trainer, state, facts, seq, per_device, compute_bytes, estimate)
            split = None if failed else choose_split(per_device, lambda b: estimate(calibration, b).total, state.usable)
            if split is not None:
                break
            rung = next_rung(facts, plan.autocast_dtype if plan else None, plan.weights_dtype if plan else None,
                             set(tried))
            if rung is None:
                self._stop(trainer, state, facts, calibration, failed, seq, tried, estimate, memory)
            self._climb(trainer, rung)
            tried.append(rung)
            facts = model_facts(model)

        if simulator is not None:
            simulator.peak_bytes = max(simulator.peak_bytes, earlier_peak)
        chosen = estimate(calibration, split.micro_batch)
        full = estimate(calibration, per_device)
        state.micro_batch = split.micro_batch if split.chunks > 1 else None
        memory.update(
            estimated_peak_bytes=chosen.total,
            estimated_peak_unsplit_bytes=full.total,
            estimate_calibrated=chosen.calibrated,
            estimate_parts=chosen.parts,
            calibration_points={str(k): v for k, v in calibration.points.items()} if calibration else {},
        )
        report.update("memory", memory)
        report.update("batch", {"micro_batch": split.micro_batch, "chunks_per_batch": split.chunks})
        if split.chunks > 1:
            sizes = chunk_sizes(per_device, split.micro_batch)
            report.change(
                "per-device batch", f"{per_device} sequences in one pass",
                f"{split.chunks} passes of {'/'.join(map(str, sizes))}",
                f"estimated peak {full.total / MIB:.0f} MiB at {per_device} x {seq} tokens is over the usable "
                f"{state.usable / MIB:.0f} MiB; losses weighted by label tokens, so gradients, optimizer steps and the "
                f"effective batch ({per_device} x {accumulation} x world) are the ones asked for",
            )

    def _calibrate(self, trainer, state, facts, seq, per_device, compute_bytes, estimate):
        """Measure the transient at micro-batch 1, and at 2 when the estimate says 2 fits; (calibration, failed)."""
        analytic = sum(activation_bytes(facts, 1, seq, compute_bytes).values())
        points: dict[int, int] = {}
        try:
            measured = self._measure(trainer, state, 1, seq)
        except Exception as error:  # a custom compute_loss that wants other inputs: estimate without measuring
            self.runtime.report.note(
                f"memory preflight: the trial step on a synthetic batch failed ({type(error).__name__}: {error}); "
                "the estimate is analytic only"
            )
            return None, False
        if measured is None:
            return Calibration({}, analytic, facts.checkpointing), True
        points[1] = measured
        calibration = Calibration(dict(points), analytic, facts.checkpointing)
        if per_device >= 2 and estimate(calibration, 2).total <= state.usable:
            try:
                measured = self._measure(trainer, state, 2, seq)
            except Exception:
                measured = None
            if measured is not None:
                points[2] = measured
        return Calibration(points, analytic, facts.checkpointing), False

    def _measure(self, trainer, state: _State, batch: int, seq: int) -> int | None:
        """One real forward/backward on a synthetic batch on the device: the bytes above the resident ones at its
        peak, or None if it ran out of memory. Gradients, RNG state and train/eval mode are left as they were."""
        import random

        import torch

        model = trainer.model
        device = state.device
        vocab = int(getattr(config_of(model), "vocab_size", 0) or 0)
        rng = (torch.get_rng_state(), random.getstate(), _numpy_state())
        mode = model.training
        saved = [(p, p.grad) for p in trainable_parameters(model)]
        for parameter, _ in saved:
            parameter.grad = None
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        inputs = trainer._prepare_inputs(inputs)
        device.empty_cache()
        base = device.allocated()
        device.reset_peak()
        result = None
        try:
            model.train()
            with device.sampling():
                with trainer.compute_loss_context_manager():
                    loss = trainer.compute_loss(model, inputs)
                loss.backward()
            del loss
            result = device.peak() - base
        except Exception as error:
            if not is_out_of_memory(error):
                raise
        finally:
            for parameter, grad in saved:
                parameter.grad = grad
            model.train(mode)
            torch.set_rng_state(rng[0])
            random.setstate(rng[1])
            _set_numpy_state(rng[2])
            del inputs
            device.empty_cache()
        return result

    def _climb(self, trainer, rung: str) -> None:
        runtime = self.runtime
        model = trainer.model
        if rung == CHECKPOINTING:
            enable_checkpointing(model)
            runtime.report.change(
                "gradient checkpointing", False, True,
                "a micro-batch of 1 does not fit: activations are recomputed in backward (non-reentrant, so LoRA's "
                "frozen inputs need no requires_grad)",
            )
        elif rung == FROZEN_DTYPE:
            import torch

            dtype_name = runtime.precision.autocast_dtype
            dtype = getattr(torch, dtype_name)
            count = 0
            for parameter in model.parameters():
                if not parameter.requires_grad and parameter.dtype == torch.float32:
                    parameter.data = parameter.data.to(dtype)
                    count += 1
            runtime.precision = runtime.precision._replace(weights_dtype=dtype_name)
            runtime.report.update("precision", {"weights_dtype": dtype_name})
            runtime.report.change(
                "frozen weights dtype", "float32", dtype_name,
                f"a micro-batch of 1 does not fit even with gradient checkpointing; the forward computes in "
                f"{dtype_name} under autocast anyway ({count} frozen tensors; trainable weights stay float32)",
            )

    def _stop(self, trainer, state, facts, calibration, failed, seq, tried, estimate, memory) -> None:
        report = self.runtime.report
        one = estimate(calibration if calibration is not None and not failed else None, 1)
        total = one.total if not failed else max(one.total, state.budget + 1)
        one = one._replace(total=total)

        def at_seq(length):
            ratio = one.total / max(1, estimate(None, 1).total)  # measured/analytic, carried to other lengths
            return int(estimate(None, 1, length).total * max(ratio, 1.0 if failed else 0.0))

        fitting = fitting_sequence(at_seq, state.usable, seq)
        text = diagnosis(one, state.budget, state.usable, facts, tried, fitting)
        if failed:
            text = text.replace("needs about", "needs more than the budget (the trial step ran out of memory), about")
        memory.update(estimated_peak_bytes=one.total, estimate_parts=one.parts, diagnosis=text)
        report.update("memory", memory)
        report.update("batch", {"micro_batch": None})
        report.event("memory_plan_failed", text, step=0, level=logging.ERROR)
        if os.environ.get(PLAN_ONLY):
            from mps_shim.report import render_plan

            print(render_plan(report.data))
        report.worth_writing = True
        report.write()
        raise MemoryPlanError(text)

    # -- splitting and recovery ---------------------------------------------------------------------------------------

    def _hook_gradients(self, trainer, state: _State) -> None:
        """Record which parameters a backward has already given their gradient (see the module docstring)."""
        touched = state.touched
        for parameter in trainable_parameters(trainer.model):
            if hasattr(parameter, "register_post_accumulate_grad_hook"):  # torch >= 2.1
                state.hooks.append(parameter.register_post_accumulate_grad_hook(touched.add))
            else:  # the gradient is complete when this runs; accumulating it allocates nothing
                state.hooks.append(parameter.register_hook(lambda grad, p=parameter: touched.add(p)))

    def _training_step(self, wrapped, trainer, args, kwargs):
        state = getattr(trainer, STATE, None)
        if state is None or not state.hooks:
            return wrapped(*args, **kwargs)
        inputs, call = inputs_and_caller(wrapped, args, kwargs)
        rows = batch_rows(inputs)
        if rows is None:
            return wrapped(*args, **kwargs)
        micro = state.micro_batch or rows

        counts, total_tokens = None, 0
        if rows > micro:  # token counts are needed only to weight chunks; see _counts for a recovery
            counts, total_tokens = _counts(inputs)
        pending = []
        start = 0
        for size in chunk_sizes(rows, micro):
            pending.append(_Piece(start, start + size))
            start += size
        result = None
        while pending:
            piece = pending.pop(0)
            whole = piece.rows == rows
            if not whole and counts is None:  # the batch was meant to run whole; a recovery split it
                counts, total_tokens = _counts(inputs)
            if whole:
                weight = None
            elif total_tokens:
                tokens = sum(counts[piece.start:piece.stop])
                if tokens == 0:
                    continue  # rows whose labels are all ignored add nothing to the loss or the gradients
                weight = tokens / total_tokens
            else:
                weight = piece.rows / rows
            piece_inputs = inputs if whole else slice_inputs(inputs, piece.start, piece.stop, rows)
            set_aside = [(p, p.grad) for p in piece.excluded]
            for parameter, _ in set_aside:
                parameter.grad = None
            state.touched.clear()
            state.weight = weight
            error_text = None
            try:
                out = call(piece_inputs)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                error_text = str(error).splitlines()[0] if str(error) else type(error).__name__
            finally:
                state.weight = None
                for parameter, grad in set_aside:  # what this run added for them was counted before
                    parameter.grad = grad
                del piece_inputs
            if error_text is None:
                result = out if result is None else result + out
                del out
                continue
            done = frozenset(piece.excluded | state.touched)
            state.touched.clear()
            state.device.empty_cache()
            state.cache_empties += 1
            self._recover(trainer, state, piece, done, pending, error_text, rows)
        self._maybe_empty_cache(state)
        if result is None:
            import torch

            result = torch.zeros((), device=trainer.args.device)
        return result

    def _recover(self, trainer, state: _State, piece: _Piece, done: frozenset, pending: list, error_text: str,
                 rows: int) -> None:
        step = trainer.state.global_step
        report = self.runtime.report
        if piece.rows == 1:
            model = trainer.model
            if is_checkpointing(model):
                raise RuntimeError(
                    f"mps-shim: out of memory on a single sequence even with gradient checkpointing at step {step}: "
                    f"{error_text}"
                )
            enable_checkpointing(model)
            report.change(
                "gradient checkpointing", False, True,
                "out of memory on a single sequence during training: activations are recomputed in backward",
            )
            pending.insert(0, _Piece(piece.start, piece.stop, done))
            detail = "re-ran 1 sequence with gradient checkpointing"
        else:
            half = math.ceil(piece.rows / 2)
            pending[0:0] = [_Piece(piece.start, piece.start + half, done), _Piece(piece.start + half, piece.stop, done)]
            previous = state.micro_batch or rows
            state.micro_batch = min(previous, half)
            split = split_for(int(trainer.args.per_device_train_batch_size), state.micro_batch)
            report.update("batch", {"micro_batch": split.micro_batch, "chunks_per_batch": split.chunks})
            # Rows still waiting in bigger pieces would run out of memory the same way: split them now.
            finer = []
            for waiting in pending:
                start = waiting.start
                for size in chunk_sizes(waiting.rows, state.micro_batch):
                    finer.append(_Piece(start, start + size, waiting.excluded))
                    start += size
            pending[:] = finer
            detail = (
                f"re-ran {piece.rows} sequences as {half} + {piece.rows - half}; batches are now split into chunks "
                f"of at most {state.micro_batch}"
            )
        state.recoveries += 1
        report.event("oom_recovered", f"training step: {error_text} -> {detail}", step=step)

    def _compute_loss(self, wrapped, trainer, args, kwargs):
        result = wrapped(*args, **kwargs)
        state = getattr(trainer, STATE, None)
        weight = state.weight if state is not None else None
        if weight is None:
            return result
        num_items = kwargs.get("num_items_in_batch", args[3] if len(args) > 3 else None)
        if loss_scaled_for_accumulation(trainer, num_items):
            return result  # a sum over the chunk divided by the whole window's item count: it adds up already
        if isinstance(result, tuple):
            return (result[0] * weight, *result[1:])
        return result * weight

    def _prediction_step(self, wrapped, trainer, args, kwargs):
        state = self._state(trainer)  # evaluate() may come without train()
        inputs, call = inputs_and_caller(wrapped, args, kwargs)
        rows = batch_rows(inputs)
        if rows is None:
            return wrapped(*args, **kwargs)

        micro = state.eval_micro_batch or rows
        labels = inputs.get("labels") if hasattr(inputs, "get") else None
        counts = label_tokens(labels).tolist() if labels is not None and labels.dim() >= 2 else None
        pending = []
        start = 0
        for size in chunk_sizes(rows, micro):
            pending.append((start, start + size))
            start += size
        results = []
        while pending:
            start, stop = pending.pop(0)
            piece_inputs = inputs if stop - start == rows else slice_inputs(inputs, start, stop, rows)
            error_text = None
            try:
                out = call(piece_inputs)
            except Exception as error:
                if not is_out_of_memory(error) or stop - start == 1:
                    raise
                error_text = str(error).splitlines()[0] if str(error) else type(error).__name__
            del piece_inputs
            if error_text is None:
                results.append((start, stop, out))
                del out
                continue
            state.device.empty_cache()
            half = math.ceil((stop - start) / 2)
            pending[0:0] = [(start, start + half), (start + half, stop)]
            state.eval_micro_batch = min(state.eval_micro_batch or rows, half)
            self.runtime.report.event(
                "oom_recovered",
                f"evaluation step: {error_text} -> re-ran {stop - start} sequences as {half} + {stop - start - half}; "
                f"evaluation batches are now split into chunks of at most {state.eval_micro_batch}",
                step=trainer.state.global_step,
            )
        if len(results) == 1:
            return results[0][2]
        return combine_predictions(results, counts, rows)

    def _evaluate(self, wrapped, trainer, args, kwargs):
        try:
            return wrapped(*args, **kwargs)
        finally:
            state = getattr(trainer, STATE, None)
            if state is not None:
                state.device.empty_cache()  # evaluation's shapes are not training's: give the cache back once
                state.cache_empties += 1

    def _maybe_empty_cache(self, state: _State) -> None:
        """Cheap policy: one query per step; empty only when the driver's total passes the usable budget."""
        if state.usable is not None and state.device.driver() > state.usable:
            state.device.empty_cache()
            state.cache_empties += 1

    # -- watch --------------------------------------------------------------------------------------------------------

    def _log(self, wrapped, trainer, args, kwargs):
        logs = kwargs.get("logs", args[0] if args else None)
        state = getattr(trainer, STATE, None)
        if state is not None and isinstance(logs, dict) and "loss" in logs:
            device = state.device
            allocated = device.sample()
            logs["memory/allocated_mib"] = round(allocated / MIB, 2)
            logs["memory/driver_mib"] = round(device.driver() / MIB, 2)
            if state.budget:
                logs["memory/budget_mib"] = round(state.budget / MIB, 2)
            logs["memory/peak_mib"] = round(device.peak() / MIB, 2)
            warning = state.watch.check()
            if warning:
                self.runtime.report.event("memory_pressure", warning, step=trainer.state.global_step)
            self.runtime.report.update("memory", {"cache_empties": state.cache_empties})
        return wrapped(*args, **kwargs)


def _counts(inputs):
    """Label tokens per row (after the causal shift) and their total; ([], 0) without 2-D labels."""
    labels = inputs.get("labels") if hasattr(inputs, "get") else None
    if labels is None or getattr(labels, "dim", lambda: 0)() < 2:
        return [], 0
    counts = label_tokens(labels).tolist()
    return counts, sum(counts)


def combine_predictions(results, counts, rows):
    """(loss, logits, labels) of the whole batch from its chunks: the loss as the batch's token mean (each chunk's
    mean weighted by its label tokens), logits and labels concatenated."""
    losses = [(start, stop, out[0]) for start, stop, out in results]
    loss = None
    if all(item[2] is not None for item in losses):
        total = sum(counts) if counts else 0
        for start, stop, value in losses:
            if total:
                share = sum(counts[start:stop]) / total
                if share == 0:
                    continue
            else:
                share = (stop - start) / rows
            loss = value * share if loss is None else loss + value * share
    logits = concat_nested([out[1] for _, _, out in results])
    labels = concat_nested([out[2] for _, _, out in results])
    return loss, logits, labels


def loss_scaled_for_accumulation(trainer, num_items) -> bool:
    """transformers 5.x's own rule (Trainer.training_step): the loss is already normalised over the accumulation
    window when the model took `num_items_in_batch` or a compute_loss_func did; 4.40 has no such path."""
    explicit = getattr(trainer, "loss_is_scaled_for_ga", None)
    if explicit is not None:
        return bool(explicit)
    return bool(
        (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items is not None)
        or getattr(trainer, "compute_loss_func", None) is not None
    )


def enable_checkpointing(model) -> None:
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


def _numpy_state():
    numpy = sys.modules.get("numpy")
    return numpy.random.get_state() if numpy is not None else None


def _set_numpy_state(state) -> None:
    if state is not None:
        sys.modules["numpy"].random.set_state(state)


PATCH = TrainerMemoryPatch
