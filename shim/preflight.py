"""The memory preflight of one Trainer, before its first step: estimate the peak, calibrate it with one real
forward/backward on a synthetic batch of the longest sequence the data can produce, and split each per-device batch
into the fewest pieces that fit the budget with headroom. If one sample does not fit: gradient checkpointing, then
frozen weights in the autocast dtype (only if the precision plan computes in it), else MemoryPlanError with one
diagnosis, before anything is trained or written.

The estimate and the policy are pure (shim/estimate.py, shim/fit.py); this module measures and applies the ladder.
"""
from __future__ import annotations

import math
import random
import sys

from mps_shim.chunking import chunk_sizes
from mps_shim.errors import MemoryPlanError
from mps_shim.estimate import Calibration, activation_bytes, estimate_peak, model_facts
from mps_shim.fit import CHECKPOINTING, FROZEN_DTYPE, choose_split, diagnosis, fitting_sequence, next_rung
from mps_shim.log import DEBUG
from mps_shim.models import config_of, enable_checkpointing, trainable_parameters
from mps_shim.oom import is_out_of_memory
from mps_shim.units import MIB

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

HEADROOM = 0.10  # of the budget, kept free: MPS heap alignment, MPSGraph scratch, fragmentation


def longest_sequence(dataset: Any, collator: Any = None) -> int | None:
    """The longest batch length the data can produce: the longest `input_ids`, rounded up as the collator pads (to
    `max_length`, a multiple, or the bucket the longest row lands in)."""
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
    bucket = getattr(collator, "bucket_for", None)  # shim/shapes.py: the batch is padded on to its bucket
    if callable(bucket) and longest:
        longest = bucket(int(longest))
    return int(longest) or None


class Preflight:
    """The memory plan of one Trainer. `run()` returns the micro-batch (None: batches run whole)."""

    def __init__(self, runtime: Any, trainer: Any, device: Any, budget: int | None, usable: int | None):
        self.runtime = runtime
        self.trainer = trainer
        self.device = device
        self.budget = budget
        self.usable = usable
        targs = trainer.args
        self.per_device = int(targs.per_device_train_batch_size)
        self.accumulation = int(targs.gradient_accumulation_steps)
        collator = getattr(trainer, "data_collator", None)
        self.seq = longest_sequence(getattr(trainer, "train_dataset", None), collator)
        eval_dataset = getattr(trainer, "eval_dataset", None)
        self.eval_seq = longest_sequence(eval_dataset, collator) or 0
        self.eval_batch = int(targs.per_device_eval_batch_size) if eval_dataset is not None else 0
        plan = runtime.precision.plan
        self.compute_bytes = 2 if plan is not None and plan.autocast_dtype else 4
        self.facts = model_facts(trainer.model)
        self.initial_facts = self.facts  # before any rung: what `mps-shim plan`'s table of Mac sizes starts from
        self.calibrations: dict[bool, Calibration] = {}  # by gradient checkpointing, for that table
        self.memory = {
            "budget_bytes": budget, "usable_bytes": usable, "headroom": HEADROOM, "longest_sequence": self.seq,
        }

    def estimate(self, calibration: Calibration | None, batch: int, seq: int | None = None):
        return estimate_peak(
            self.facts, batch, seq or self.seq, self.compute_bytes, str(self.trainer.args.optim), calibration,
            accumulates=self.accumulation > 1 or batch < self.per_device, eval_batch=self.eval_batch,
            eval_seq=self.eval_seq,
        )

    def run(self) -> int | None:
        report = self.runtime.report
        if self.seq is None or self.facts.vocab == 0 or self.budget is None:
            report.update("memory", self.memory)
            report.note("memory preflight skipped: the longest sequence or the model's shape is unknown")
            return None
        simulator = self.runtime.simulator
        earlier_peak = simulator.peak_bytes if simulator is not None else 0
        tried: list[str] = []
        while True:
            calibration, failed = self._calibrate()
            if calibration is not None and not failed:
                self.calibrations.setdefault(self.facts.checkpointing, calibration)
            split = None if failed else choose_split(
                self.per_device, lambda batch: self.estimate(calibration, batch).total, self.usable
            )
            if split is not None:
                break
            plan = self.runtime.precision.plan
            rung = next_rung(
                self.facts, plan.autocast_dtype if plan else None, plan.weights_dtype if plan else None, set(tried)
            )
            if rung is None:
                self._stop(calibration, failed, tried)
            self._climb(rung)
            tried.append(rung)
            self.facts = model_facts(self.trainer.model)
        if simulator is not None:  # the trial steps are not the run's peak
            simulator.peak_bytes = max(simulator.peak_bytes, earlier_peak)
        self._record(calibration, split)
        self._size_for_plan()
        return split.micro_batch if split.chunks > 1 else None

    def _record(self, calibration: Calibration | None, split) -> None:
        report = self.runtime.report
        chosen = self.estimate(calibration, split.micro_batch)
        full = self.estimate(calibration, self.per_device)
        self.memory.update(
            estimated_peak_bytes=chosen.total,
            estimated_peak_unsplit_bytes=full.total,
            estimate_calibrated=chosen.calibrated,
            estimate_phase=chosen.phase,
            estimate_parts=chosen.parts,
            calibration_points={str(k): v for k, v in calibration.points.items()} if calibration else {},
        )
        report.update("memory", self.memory)
        report.update("batch", {"micro_batch": split.micro_batch, "chunks_per_batch": split.chunks})
        if split.chunks > 1:
            sizes = chunk_sizes(self.per_device, split.micro_batch)
            report.change(
                "per-device batch", f"{self.per_device} sequences in one pass",
                f"{split.chunks} passes of {'/'.join(map(str, sizes))}",
                f"estimated peak {full.total / MIB:.0f} MiB at {self.per_device} x {self.seq} tokens is over the "
                f"usable {self.usable / MIB:.0f} MiB; losses weighted by label tokens, so gradients, optimizer steps "
                f"and the effective batch ({self.per_device} x {self.accumulation} x world) are the ones asked for",
            )

    def _size_for_plan(self) -> None:
        """`mps-shim plan`: the table of several Mac sizes (shim/sizing.py), from this preflight's facts."""
        if self.runtime.plan_only:
            from mps_shim.sizing import record_for_plan

            record_for_plan(self)

    def _calibrate(self) -> tuple[Calibration | None, bool]:
        """Measure the transient at micro-batch 1, and at 2 when the estimate says 2 fits; (calibration, failed)."""
        facts = self.facts
        if any(parameter.is_meta for parameter in self.trainer.model.parameters()):
            from mps_shim.sizing import scaled_calibration  # a model without weights (patches/modeling.py)

            return scaled_calibration(self, facts, facts.checkpointing), False
        analytic = sum(activation_bytes(facts, 1, self.seq, self.compute_bytes).values())
        try:
            measured = self._measure(1)
        except Exception as error:  # a custom compute_loss that wants other inputs: estimate without measuring
            self.runtime.report.note(
                f"memory preflight: the trial step on a synthetic batch failed ({type(error).__name__}: {error}); "
                "the estimate is analytic only"
            )
            return None, False
        if measured is None:
            return Calibration({}, analytic, facts.checkpointing), True
        points = {1: measured}
        one_point = Calibration(dict(points), analytic, facts.checkpointing)
        if self.per_device >= 2 and self.estimate(one_point, 2).total <= self.usable:
            try:
                measured = self._measure(2)
            except Exception:
                measured = None
            if measured is not None:
                points[2] = measured
        return Calibration(points, analytic, facts.checkpointing), False

    def _measure(self, batch: int, model: Any = None) -> int | None:
        """One real forward/backward on a synthetic batch on the device: the bytes above the resident ones at its
        peak, or None if it ran out of memory. Gradients, RNG state and train/eval mode are left as they were.
        `model`: another model to measure than the Trainer's (shim/sizing.py's twins)."""
        import torch

        trainer, device = self.trainer, self.device
        model = trainer.model if model is None else model
        vocab = int(getattr(config_of(model), "vocab_size", 0) or 0)
        numpy = sys.modules.get("numpy")
        rng = (torch.get_rng_state(), random.getstate(), numpy.random.get_state() if numpy is not None else None)
        mode = model.training
        saved = [(p, p.grad) for p in trainable_parameters(model)]
        for parameter, _ in saved:
            parameter.grad = None
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch, self.seq), generator=generator)
        synthetic = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        inputs = trainer._prepare_inputs(synthetic)
        device.empty_cache()
        base = device.in_use()
        device.reset_peak()
        result = None
        try:
            model.train()
            with device.sampling(), device.device_work():
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
            if rng[2] is not None:
                numpy.random.set_state(rng[2])
            del inputs
            device.empty_cache()
        return result

    def _climb(self, rung: str) -> None:
        runtime = self.runtime
        model = self.trainer.model
        if rung == CHECKPOINTING:
            enable_checkpointing(model)
            runtime.report.change(
                "gradient checkpointing", False, True,
                "a micro-batch of 1 does not fit: activations are recomputed in backward (non-reentrant, so LoRA's "
                "frozen inputs need no requires_grad)",
            )
        elif rung == FROZEN_DTYPE:
            runtime.precision.lower_frozen_weights(
                model, "a micro-batch of 1 does not fit even with gradient checkpointing"
            )

    def _stop(self, calibration: Calibration | None, failed: bool, tried: list[str]) -> None:
        report = self.runtime.report
        one = self.estimate(calibration if calibration is not None and not failed else None, 1)
        if failed:
            one = one._replace(total=max(one.total, self.budget + 1))

        def at_seq(length: int) -> int:
            ratio = one.total / max(1, self.estimate(None, 1).total)  # measured/analytic, carried to other lengths
            return int(self.estimate(None, 1, length).total * max(ratio, 1.0 if failed else 0.0))

        fitting = fitting_sequence(at_seq, self.usable, self.seq)
        text = diagnosis(one, self.budget, self.usable, self.facts, tried, fitting)
        if failed:
            text = text.replace("needs about", "needs more than the budget (the trial step ran out of memory), about")
        self.memory.update(estimated_peak_bytes=one.total, estimate_parts=one.parts, diagnosis=text)
        report.update("memory", self.memory)
        # Recorded, not logged: the one line the user sees is the error's, printed where it is caught.
        report.event("memory_plan_failed", text, step=0, level=DEBUG)
        self._size_for_plan()
        raise MemoryPlanError(text)
