"""Will it fit on a Mac, answered before the weights are downloaded: `mps-shim plan`'s table of Mac sizes, and the
calibration of a model without weights (built on the meta device by patches/modeling.py under `mps-shim plan`).

Such a model cannot run: the preflight measures two small real-weight twins of it instead (1 and 2 layers, widths and
heads divided by a power of two, the head size kept) and `carry_over` scales what they show up to the full model.
`size_row` answers for one Mac size by the preflight's own rules (shim/fit.py): the budget is Metal's recommended
working set for that size, the split of each batch, then gradient checkpointing, then half-precision frozen weights,
and when nothing fits, what would: a shorter sequence, no `modules_to_save`, a smaller LoRA rank.
Pure functions, except `scaled_calibration` and `record_for_plan`, which the preflight calls.
"""
from __future__ import annotations

import math
import re
from collections import namedtuple

from mps_shim.estimate import Calibration, activation_bytes, estimate_peak, model_facts
from mps_shim.fit import CHECKPOINTING, FROZEN_DTYPE, choose_split, fitting_sequence, next_rung, usable
from mps_shim.preflight import HEADROOM
from mps_shim.units import GIB, size_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from mps_shim.estimate import ModelFacts

PLAN_SIZES = "MPS_SHIM_PLAN_SIZES"  # set by `mps-shim plan --mac-sizes`, passed on to the processes it starts
TWIN_WIDEST = 512  # hidden size the twins are narrowed to (or below), as far as the key/value heads divide
TWIN_LAYERS = (1, 2)

Shape = namedtuple("Shape", "per_device accumulation seq eval_batch eval_seq compute_bytes optim")
Shape.__doc__ = "The run's shape as the preflight sees it (shim/preflight.py)."

LoraFacts = namedtuple("LoraFacts", "rank lora_bytes lora_count largest_lora_bytes largest_save_bytes")
LoraFacts.__doc__ = "The LoRA part of the trainables (what a smaller rank shrinks in proportion), from the model."


# -- the sizes asked for --------------------------------------------------------------------------------------------


def parse_mac_sizes(value: str, source: str) -> tuple[int, ...]:
    """'8GB,16GB,24GiB' -> Mac memory sizes in bytes, as sold (capabilities.mac_memory: 16GB is 16 GiB). Sizes no
    Apple-silicon Mac has (shim/capabilities.py) are refused like a bad size."""
    from mps_shim.capabilities import MAC_MEMORY_LARGEST, MAC_MEMORY_SMALLEST, mac_memory
    from mps_shim.config import parse_size
    from mps_shim.errors import ShimConfigError

    sizes = []
    for part in str(value).split(","):
        size = mac_memory(parse_size(part.strip(), source))
        if not MAC_MEMORY_SMALLEST <= size <= MAC_MEMORY_LARGEST:
            raise ShimConfigError(
                f"{source}={value!r}: {part.strip()} is no Mac's memory; Apple-silicon Macs have 8 GB to 512 GB"
            )
        sizes.append(size)
    return tuple(sizes)


def plan_sizes(environ) -> tuple[int, ...] | None:
    value = environ.get(PLAN_SIZES)
    return parse_mac_sizes(value, PLAN_SIZES) if value and value.strip() else None


# -- calibrating a model without weights on two small twins ---------------------------------------------------------


def twin_overrides(facts: ModelFacts, layers: int, widest: int = TWIN_WIDEST) -> tuple[int, dict]:
    """(divisor, config changes) of a twin with `layers` layers: hidden, intermediate, vocabulary and the heads divided
    by the largest power of two that brings the hidden size to `widest` or below and still divides the heads."""
    divisor = 1
    while facts.hidden // divisor > widest and facts.kv_heads % (2 * divisor) == 0 and facts.heads % (2 * divisor) == 0:
        divisor *= 2
    return divisor, {
        "num_hidden_layers": layers,
        "hidden_size": facts.hidden // divisor,
        "intermediate_size": math.ceil(facts.intermediate / divisor),
        "num_attention_heads": facts.heads // divisor,
        "num_key_value_heads": facts.kv_heads // divisor,
        "vocab_size": math.ceil(facts.vocab / divisor),
    }


def _activations(facts: ModelFacts, batch: int, seq: int, compute_bytes: int, checkpointing: bool) -> int:
    return sum(activation_bytes(facts, batch, seq, compute_bytes, checkpointing).values())


def _by_layers(at) -> tuple[float, float]:
    """(the part that does not grow with the layers, the part per layer) of a figure linear in them, from 1 and 2."""
    one, two = at(1), at(2)
    return 2 * one - two, two - one


def carry_over(
    measured: dict[tuple[int, int], int], twin_facts: dict[int, ModelFacts], twin_basis: dict[int, int],
    facts: ModelFacts, basis: tuple[int, int], seq: int, compute_bytes: int, checkpointing: bool,
) -> tuple[dict[int, int], dict[str, float]]:
    """What the preflight would have measured on the full model at micro-batches 1 and 2, from the twins'
    measurements {(layers, batch): bytes}, and the ratios used. Each part separately for the layers and for the rest.

    A measurement is a line in the batch. What grows with it is activations: its ratio to the analytic activations
    (shim/estimate.py) carries over. What does not is shaped like parameters (gradients made before the peak,
    half-precision copies of trainable or fp32 weights under autocast; a `modules_to_save` embedding is vocabulary x
    hidden, which shrinks twice as fast as activations): it is carried in proportion to `parameter_basis`, given as
    (outside the layers, in all of them) for the full model and {layers: total} for the twins."""
    def line(layers):
        one, two = measured[(layers, 1)], measured[(layers, 2)]
        return one - (two - one), two - one  # (the part that does not grow with the batch, per sample)

    per_sample = _by_layers(lambda n: line(n)[1])
    analytic = _by_layers(lambda n: _activations(twin_facts[n], 1, seq, compute_bytes, checkpointing))
    full = _by_layers(lambda n: _activations(facts._replace(layers=n), 1, seq, compute_bytes, checkpointing))
    fixed = _by_layers(lambda n: line(n)[0])
    twin_base = _by_layers(twin_basis.get)
    full_base = (basis[0], basis[1] / max(facts.layers, 1))
    if facts.layers < 2:  # one layer, one twin: all of it is "fixed"
        full, full_base = (_activations(facts, 1, seq, compute_bytes, checkpointing), 0.0), (sum(basis), 0.0)
    names = ("activations fixed", "activations per layer", "parameter-shaped fixed", "parameter-shaped per layer")
    pairs = (*zip(per_sample, analytic), *zip(fixed, twin_base))
    ratios = {name: max(part, 0.0) / base if base > 0 else 0.0 for name, (part, base) in zip(names, pairs)}
    sample = ratios["activations fixed"] * full[0] + ratios["activations per layer"] * full[1] * facts.layers
    constant = sum(
        ratios[f"parameter-shaped {where}"] * full_base[i] * count if twin_base[i] > 0 else max(fixed[i], 0) * count
        for i, (where, count) in enumerate((("fixed", 1), ("per layer", facts.layers)))
    )
    # At the end of backward every gradient exists: a first micro-step never needs less than all of them.
    return {batch: int(max(constant + batch * sample, facts.trainable_bytes)) for batch in (1, 2)}, ratios


def parameter_basis(model: Any, compute_bytes: int) -> tuple[int, int]:
    """(outside the numbered blocks, inside them) bytes of what the batch-independent part of a step follows:
    trainable parameters (their gradients, their copies under autocast), and fp32 frozen ones under autocast (their
    half-precision copies, kept for backward)."""
    outside = inside = 0
    for name, parameter in model.named_parameters():
        if parameter.requires_grad or (compute_bytes == 2 and parameter.dtype.is_floating_point and parameter.element_size() == 4):
            nbytes = parameter.numel() * parameter.element_size()
            if re.search(r"\.\d+\.", name):
                inside += nbytes
            else:
                outside += nbytes
    return outside, inside


def scaled_calibration(preflight: Any, facts: ModelFacts, checkpointing: bool) -> Calibration | None:
    """Measure two twins of the preflight's model (which has no weights) at micro-batches 1 and 2 as the preflight
    measures a model, and carry the measurements over to `facts`; None if a twin's step failed. Recorded in the
    report."""
    import gc

    from mps_shim.patches.modeling import scaled_twin

    runtime, seq, model, compute = preflight.runtime, preflight.seq, preflight.trainer.model, preflight.compute_bytes
    layer_counts = TWIN_LAYERS if facts.layers >= 2 else (1,)
    measured, twin_facts, twin_basis = {}, {}, {}
    freeze = gc.get_freeze_count() == 0  # nobody else's freeze to undo
    if freeze:
        gc.freeze()  # what exists now is no twin's garbage: the collections of each measurement skip it
    try:
        for layers in layer_counts:
            divisor, overrides = twin_overrides(facts, layers)
            twin = scaled_twin(model, overrides, preflight.trainer.args.device, checkpointing)
            runtime.place(twin)
            twin_facts[layers], twin_basis[layers] = model_facts(twin), sum(parameter_basis(twin, compute))
            for batch in (1, 2):
                measured[(layers, batch)] = preflight._measure(batch, twin)
                if measured[(layers, batch)] is None:
                    return None
            del twin
    finally:
        if freeze:
            gc.unfreeze()
    if len(layer_counts) == 1:  # a model of one layer: its twin has no part per layer to tell apart
        measured.update({(2, b): measured[(1, b)] for b in (1, 2)})
        twin_facts[2], twin_basis[2] = twin_facts[1], twin_basis[1]
    points, ratios = carry_over(
        measured, twin_facts, twin_basis, facts, parameter_basis(model, compute), seq, compute, checkpointing
    )
    text = (
        f"twins of {' and '.join(map(str, layer_counts))} layer(s), widths 1/{divisor} (hidden "
        f"{facts.hidden // divisor}), real weights; measured/analytic "
        + ", ".join(f"{name} {value:.2f}" for name, value in ratios.items())
    )
    runtime.report.update("memory", {"estimate_scaled_checkpointing" if checkpointing else "estimate_scaled": text})
    runtime.report.note(f"memory preflight: the model has no weights; calibrated on scaled {text}, carried over")
    return Calibration(points, _activations(facts, 1, seq, compute, checkpointing), checkpointing)


# -- the table of Mac sizes ------------------------------------------------------------------------------------------


def lora_facts(model: Any) -> LoraFacts | None:
    """The LoRA part of a peft model's trainables, or None (no LoRA adapter)."""
    adapters = getattr(model, "peft_config", None) or {}
    rank = next((getattr(config, "r", None) for config in adapters.values()), None)
    if not rank:
        return None
    size = count = largest = largest_save = 0
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            nbytes = parameter.numel() * parameter.element_size()
            if "lora_" in name:
                size, count, largest = size + nbytes, count + parameter.numel(), max(largest, nbytes)
            elif "modules_to_save" in name:
                largest_save = max(largest_save, nbytes)
    return LoraFacts(rank, size, count, largest, largest_save)


def _less_trainable(facts: ModelFacts, nbytes: int, count: int, largest: int, **changes) -> ModelFacts:
    return facts._replace(
        weight_bytes=facts.weight_bytes - nbytes, trainable_bytes=facts.trainable_bytes - nbytes,
        trainable_count=facts.trainable_count - count, largest_trainable_bytes=largest, **changes,
    )


def without_modules_to_save(facts: ModelFacts, lora: LoraFacts | None) -> ModelFacts:
    return _less_trainable(
        facts, facts.modules_to_save_bytes, facts.modules_to_save_count,
        lora.largest_lora_bytes if lora else facts.largest_trainable_bytes, modules_to_save_bytes=0,
        modules_to_save_count=0,
    )


def with_rank(facts: ModelFacts, lora: LoraFacts, rank: int) -> ModelFacts:
    scale = rank / lora.rank
    return _less_trainable(
        facts, lora.lora_bytes - int(lora.lora_bytes * scale), lora.lora_count - int(lora.lora_count * scale),
        max(lora.largest_save_bytes, int(lora.largest_lora_bytes * scale)),
    )


def _estimate(facts, calibrations, shape: Shape, batch: int, seq: int | None = None):
    return estimate_peak(
        facts, batch, seq or shape.seq, shape.compute_bytes, shape.optim, calibrations.get(facts.checkpointing),
        accumulates=shape.accumulation > 1 or batch < shape.per_device, eval_batch=shape.eval_batch,
        eval_seq=shape.eval_seq,
    )


def _climb(facts: ModelFacts, rung: str) -> ModelFacts:
    if rung == CHECKPOINTING:
        return facts._replace(checkpointing=True)
    halved = facts.frozen_float32_bytes // 2  # fp32 -> the 2-byte autocast dtype
    return facts._replace(
        weight_bytes=facts.weight_bytes - halved, frozen_bytes=facts.frozen_bytes - halved, frozen_float32_bytes=0
    )


def ladder(facts: ModelFacts, calibrations: dict, shape: Shape, plan: Any, usable_bytes: int):
    """(split or None, the facts after the rungs climbed, the rungs): the preflight's ladder, on estimates only."""
    rungs: list[str] = []
    while True:
        split = choose_split(shape.per_device, lambda b: _estimate(facts, calibrations, shape, b).total, usable_bytes)
        if split is not None:
            return split, facts, rungs
        weights = plan.weights_dtype if FROZEN_DTYPE not in rungs else plan.autocast_dtype
        rung = next_rung(facts, plan.autocast_dtype, weights, set(rungs))
        if rung is None:
            return None, facts, rungs
        rungs.append(rung)
        facts = _climb(facts, rung)


def size_row(memory: int, facts, calibrations: dict, shape: Shape, plan: Any, lora: LoraFacts | None) -> dict:
    """One Mac size: whether the run fits, how, its estimated peak against the budget, and what to change if not."""
    from mps_shim.capabilities import recommended_working_set

    budget = recommended_working_set(memory)
    room = usable(budget, HEADROOM)
    split, final, rungs = ladder(facts, calibrations, shape, plan, room)
    peak = _estimate(final, calibrations, shape, split.micro_batch if split else 1)
    row = {
        "memory_bytes": memory, "budget_bytes": budget, "usable_bytes": room, "fits": split is not None,
        "micro_batch": split.micro_batch if split else None, "chunks_per_batch": split.chunks if split else None,
        "gradient_checkpointing": final.checkpointing,
        "frozen_weights_dtype": plan.autocast_dtype if FROZEN_DTYPE in rungs else plan.weights_dtype,
        "estimated_peak_bytes": peak.total, "calibrated": peak.calibrated, "to_fit": [],
    }
    if split is None:
        row["to_fit"] = _what_would_fit(facts, final, calibrations, shape, plan, lora, room, peak)
    return row


def _what_would_fit(facts, final, calibrations, shape, plan, lora, room, peak) -> list[str]:
    changes = []
    analytic_one = _estimate(final, {}, shape, 1).total
    ratio = max(peak.total / max(analytic_one, 1), 1.0)  # measured/analytic, carried to other lengths as the preflight
    seq = fitting_sequence(lambda s: int(_estimate(final, {}, shape, 1, s).total * ratio), room, shape.seq)
    if seq:
        changes.append(f"--max_seq_length {seq}")
    if facts.modules_to_save_bytes:
        lighter = without_modules_to_save(facts, lora)
        if ladder(lighter, calibrations, shape, plan, room)[0] is not None:  # measured as is: on the safe side
            changes.append("no --modules_to_save")
    if lora is not None:
        rank = lora.rank // 2
        while rank >= 1:
            smaller = with_rank(facts, lora, rank)
            if ladder(smaller, calibrations, shape, plan, room)[0] is not None:
                changes.append(f"--lora_rank {rank}")
                break
            rank //= 2
    return changes


def mac_name(memory: int) -> str:
    return f"{memory // GIB} GB" if memory % GIB == 0 else size_text(memory)


def render(section: dict | None) -> list[str]:
    """The plan's lines for the report's `sizing` section: what was sized, then one row per Mac."""
    if not section:
        return []
    header = ("Mac", "budget", "fits", "micro-batch", "checkpointing", "frozen weights", "estimated peak", "to fit")
    rows = [header] + [(
        mac_name(row["memory_bytes"]), size_text(row["budget_bytes"]), "yes" if row["fits"] else "no",
        str(row["micro_batch"] or "-"), "yes" if row["gradient_checkpointing"] else "no", row["frozen_weights_dtype"],
        size_text(row["estimated_peak_bytes"]) + ("" if row["calibrated"] else " (analytic)"),
        " or ".join(row["to_fit"]) or ("-" if row["fits"] else "a larger Mac"),
    ) for row in section["rows"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [f"  sizing: {section['what']}", f"  sizing estimates: {section['calibration']}"]
    lines += ["    " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return lines


def record_for_plan(preflight: Any) -> None:
    """`mps-shim plan`: the table for the Mac sizes asked for (MPS_SHIM_PLAN_SIZES), else for this Mac's memory, as
    the report's `sizing` section (the plan prints it). The model as the run asked for it, before any rung."""
    import os

    runtime, facts = preflight.runtime, preflight.initial_facts
    device = runtime.facts
    plan = runtime.precision.plan
    sizes = plan_sizes(os.environ) or ((device.memory_total_bytes,) if device.memory_total_bytes else ())
    model = preflight.trainer.model
    calibrations = dict(preflight.calibrations)
    meta = any(parameter.is_meta for parameter in model.parameters())
    shape = Shape(
        preflight.per_device, preflight.accumulation, preflight.seq, preflight.eval_batch, preflight.eval_seq,
        preflight.compute_bytes, str(preflight.trainer.args.optim),
    )
    lora = lora_facts(model)
    rows = [size_row(memory, facts, calibrations, shape, plan, lora) for memory in sizes]
    # Without weights the twins can be measured in the other checkpointing state too, when a row ends up in it.
    for checkpointing in sorted({row["gradient_checkpointing"] for row in rows if meta and not row["calibrated"]}):
        calibration = scaled_calibration(preflight, facts, checkpointing)
        if calibration is not None:
            calibrations[checkpointing] = calibration
            rows = [size_row(memory, facts, calibrations, shape, plan, lora) for memory in sizes]
    how = "scaled: the model has no weights, so two small real-weight twins of it were measured and carried over"
    runtime.report.update("sizing", {
        "what": f"macOS {device.macos}, torch {device.torch}, {plan.chosen} (frozen weights {plan.weights_dtype}), "
                f"per-device batch {shape.per_device} x accumulation {shape.accumulation} at {shape.seq} tokens",
        "calibration": (how if meta else "calibrated with one real forward/backward of this model")
        + " (analytic where no measurement applies)", "scaled": meta, "macos": device.macos,
        "torch": device.torch, "precision": plan.chosen, "rows": rows,
    })
