"""How a run fits its memory budget: the split of each batch, the ladder of what to give up when even one sample does
not fit, the longest sequence that would fit, and the diagnosis when nothing does. Pure functions of estimates.
"""
from __future__ import annotations

import math
from collections import namedtuple

from mps_shim.chunking import chunk_sizes
from mps_shim.units import size_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable

    from mps_shim.estimate import Estimate, ModelFacts

Split = namedtuple("Split", "micro_batch chunks")
Split.__doc__ = """How one per-device batch is computed: `chunks` forward/backward passes of at most `micro_batch`
sequences (sizes as equal as possible), their losses weighted by their share of the batch's label tokens so the
gradients are the unsplit batch's. per_device x accumulation x world size, the effective batch, is unchanged."""


def split_for(per_device: int, micro_batch: int) -> Split:
    sizes = chunk_sizes(per_device, micro_batch)
    return Split(max(sizes) if sizes else micro_batch, len(sizes))


def choose_split(per_device: int, estimate_for: Callable[[int], int], usable_bytes: int) -> Split | None:
    """The fewest chunks of each per-device batch whose estimated peak fits `usable_bytes`; None if one sample does
    not fit. Chunks need not divide the batch: unequal chunks are weighted exactly (see Split)."""
    for chunks in range(1, per_device + 1):
        micro = math.ceil(per_device / chunks)
        if chunks > 1 and math.ceil(per_device / (chunks - 1)) == micro:
            continue  # same largest chunk as with fewer chunks: no better
        if estimate_for(micro) <= usable_bytes:
            return split_for(per_device, micro)
    return None


def usable(budget_bytes: int, headroom: float) -> int:
    return int(budget_bytes * (1.0 - headroom))


CHECKPOINTING = "gradient_checkpointing"
FROZEN_DTYPE = "frozen_weights_dtype"


def next_rung(facts: ModelFacts, autocast_dtype: str | None, weights_dtype: str | None, tried: set) -> str | None:
    """The next thing to change when a micro-batch of 1 does not fit: gradient checkpointing, then frozen weights in
    the autocast dtype (only when the precision plan computes in it anyway and they are fp32 now), then nothing."""
    if CHECKPOINTING not in tried and not facts.checkpointing:
        return CHECKPOINTING
    if (
        FROZEN_DTYPE not in tried
        and autocast_dtype is not None
        and weights_dtype in (None, "float32")
        and facts.frozen_float32_bytes > 0
    ):
        return FROZEN_DTYPE
    return None


def fitting_sequence(estimate_at: Callable[[int], int], usable_bytes: int, longest: int) -> int | None:
    """The longest sequence (a multiple of 8, up to `longest`) at which estimate_at(seq) fits, or None."""
    low, high = 0, longest
    while high - low > 8:
        middle = (low + high) // 2
        if estimate_at(middle) <= usable_bytes:
            low = middle
        else:
            high = middle
    low = low // 8 * 8
    return low if low >= 8 and estimate_at(low) <= usable_bytes else None


def diagnosis(
    estimate: Estimate, budget_bytes: int, usable_bytes: int, facts: ModelFacts, tried: list[str],
    fitting_seq: int | None = None,
) -> str:
    """One message: what takes the memory, by how much the run is over, and what the user can change."""
    parts = sorted(((name, value) for name, value in estimate.parts.items() if value > 0), key=lambda item: -item[1])
    shown = ", ".join(f"{name.replace('_', ' ')} {size_text(value)}" for name, value in parts)
    over = estimate.total - usable_bytes
    options = []
    if fitting_seq:
        options.append(f"--max_seq_length {fitting_seq} or shorter samples (the longest is {estimate.seq} tokens)")
    elif estimate.seq > 8:
        options.append(f"shorter sequences (the longest is {estimate.seq} tokens)")
    if facts.modules_to_save_bytes:
        # weights, gradients and two AdamW states for each full trainable copy
        freed = facts.modules_to_save_bytes * 4
        options.append(f"fewer --modules_to_save (they take about {size_text(freed)} with gradients and AdamW state)")
    options.append("a smaller LoRA rank or fewer LoRA target modules")
    options.append("a larger --memory-limit (at most the Mac's memory, at the risk of swapping)")
    options.append("a smaller model")
    done = f" after {' and '.join(tried)}" if tried else ""
    return (
        f"this run cannot fit in memory{done}: a micro-batch of 1 at {estimate.seq} tokens needs about "
        f"{size_text(estimate.total)} ({shown}); the budget is {size_text(budget_bytes)} "
        f"({size_text(usable_bytes)} with headroom), {size_text(over)} over. Options: " + "; ".join(options)
        + ". Nothing was trained or written."
    )
