"""Which side training batches are padded on, where the padding side decides whether MPS gives NaN.

MPS's scaled_dot_product_attention returns NaN for a query row whose keys are all masked in torch 2.2-2.8
(shim/known_bugs.py, `sdpa_fully_masked_rows`). With a causal mask that happens exactly with left padding: the first
(padding) position may attend only to itself, which is padding. With right padding every row keeps at least its first
real token. Labels of padding positions are -100 either way, so for training the side changes nothing else; the
example's DataCollatorForSeq2Seq (and transformers' other collators) pad on `tokenizer.padding_side`.

`training_padding_side` is the decision (pure); `pad_right_for_training` applies it to a tokenizer and says so in
the report. Callers: whatever builds training batches (the Trainer patch, a collator that buckets shapes).
"""
from __future__ import annotations

from mps_shim.known_bugs import KNOWN_BUGS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_BUG = next(bug for bug in KNOWN_BUGS if bug.key == "sdpa_fully_masked_rows")


def training_padding_side(current: str | None, torch_version: str, is_mps: bool) -> str | None:
    """The side training batches must be padded on instead of `current`, or None to keep it."""
    if is_mps and current == "left" and _BUG.affects(torch_version):
        return "right"
    return None


def pad_right_for_training(tokenizer: Any, runtime: Any) -> bool:
    """Pad `tokenizer`'s training batches on the right where left padding gives NaN on this MPS; True if changed."""
    if tokenizer is None or not runtime.changes_numbers:
        return False
    facts = runtime.facts
    side = training_padding_side(getattr(tokenizer, "padding_side", None), facts.torch, facts.is_mps)
    if side is None:
        return False
    tokenizer.padding_side = side
    runtime.report.change(
        "tokenizer.padding_side", "left", side,
        f"MPS attention gives NaN for fully masked rows in torch 2.2-2.8 (torch {facts.torch}), which left padding "
        "creates; padding labels are -100 on either side",
    )
    return True


def pad_trainer_right(trainer: Any, runtime: Any) -> bool:
    """`pad_right_for_training` for the tokenizers a Trainer's batches are padded with: its data collator's and its
    processing class (`tokenizer` before transformers 4.46). True if one was changed. One call, before training."""
    seen, changed = set(), False
    for owner, name in ((getattr(trainer, "data_collator", None), "tokenizer"), (trainer, "processing_class"),
                        (trainer, "tokenizer")):
        tokenizer = getattr(owner, name, None) if owner is not None else None
        if tokenizer is not None and id(tokenizer) not in seen and hasattr(tokenizer, "padding_side"):
            seen.add(id(tokenizer))
            changed = pad_right_for_training(tokenizer, runtime) or changed
    return changed
