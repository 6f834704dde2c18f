"""A bounded number of batch shapes on the Apple GPU: padding lengths rounded up into a few buckets.

MPS compiles one MPSGraph per op signature (shapes and dtypes) and keeps it for the life of the process; no released
torch frees that cache (docs/mps-facts.md, "Long runs"). A collator that pads each batch to its longest row makes a
new signature for every new length, so the driver's memory creeps up over a long run. `BucketingCollator` wraps the
Trainer's collator and pads each batch further, to the smallest of at most `MAX_BUCKETS` lengths that holds it.

The loss is unchanged: the added positions are right padding, with attention_mask 0 and labels -100, so no label
token is added and, in a causal model, no real token attends to them (each padded query row still sees the real
tokens before it, so no attention row is fully masked). A batch the wrapper cannot pad safely (left padding, a
2-D per-token field it does not know the padding value of, no input_ids) is passed on unchanged.

`bucket_lengths` and `bucket_for` are pure; shim/memory_guard.py installs the wrapper at the start of Trainer.train
and shim/preflight.py plans for the bucket the longest row lands in.
"""
from __future__ import annotations

import math

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_BUCKETS = 8  # at most this many padded lengths up to the longest sequence; 0 turns bucketing off
MULTIPLE = 8  # bucket lengths below the longest are multiples of 8
# Per-token fields and the value their padding takes. The padding is on the right, after every real token.
PAD_VALUES = {"attention_mask": 0, "labels": -100, "token_type_ids": 0, "special_tokens_mask": 1, "loss_mask": 0}


def bucket_lengths(longest: int, count: int = MAX_BUCKETS, multiple: int = MULTIPLE) -> list[int]:
    """At most `count` lengths, evenly spaced up to `longest` (the last): a row of any length up to the longest is
    padded by at most longest/count tokens more than to its batch's longest row."""
    if longest <= 0 or count <= 0:
        return []
    lengths = {min(longest, int(math.ceil(longest * k / count / multiple)) * multiple) for k in range(1, count + 1)}
    return sorted(lengths | {longest})


def bucket_for(length: int, buckets: list[int], cap: int | None = None) -> int:
    """The padded length of a batch whose longest row has `length` tokens: the smallest bucket that holds it. Past
    the last bucket (a longer evaluation set, an unknown longest), the next power of two, still few distinct shapes,
    but never past `cap` (the model's positions) unless the batch itself is longer."""
    for bucket in buckets:
        if bucket >= length:
            return bucket
    power = 1 << max(0, length - 1).bit_length()
    return max(length, min(power, cap)) if cap else power


class BucketingCollator:
    """The Trainer's data collator, with each batch padded on the right to its bucket's length.

    A top-level class with plain attributes, so that DataLoader workers started with `spawn` (macOS's default) can
    pickle it."""

    def __init__(self, inner: Any, buckets: list[int], pad_token_id: int = 0, cap: int | None = None):
        self.inner = inner
        self.buckets = list(buckets)
        self.pad_token_id = int(pad_token_id)
        self.cap = cap
        self.unpadded: str | None = None  # why the last batch was passed on unchanged, if it was

    def bucket_for(self, length: int) -> int:
        return bucket_for(length, self.buckets, self.cap)

    def __getattr__(self, name: str) -> Any:  # the inner collator's own attributes (tokenizer, padding, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, features: Any) -> Any:
        batch = self.inner(features)
        padded, why = pad_batch(batch, self.bucket_for, self.pad_token_id)
        self.unpadded = why
        return batch if padded is None else padded


def pad_batch(batch: Any, bucket: Any, pad_token_id: int) -> tuple[Any, str | None]:
    """(the batch padded on the right to bucket(its length), None), or (None, why it is left as it is)."""
    import torch

    ids = batch.get("input_ids") if hasattr(batch, "get") else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None, "no 2-D input_ids"
    rows, length = ids.shape
    target = bucket(length)
    if target <= length:
        return None, None
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape and rows and length:
        if bool(((mask[:, 0] == 0) & (mask[:, -1] != 0)).any()):
            return None, "left padding: added positions would be masked attention rows"
    values = {"input_ids": pad_token_id, **PAD_VALUES}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (rows, length):
            if key not in values:
                return None, f"per-token field {key!r} has no known padding value"
    padded = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (rows, length):
            grown = value.new_full((rows, target, *value.shape[2:]), values[key])
            grown[:, :length] = value
            padded[key] = grown
        else:
            padded[key] = value
    if not isinstance(batch, dict):  # transformers' BatchEncoding and other mappings: the same type back
        try:
            return type(batch)(padded), None
        except Exception:
            pass
    return padded, None


def pad_token_of(trainer: Any) -> int:
    """The pad token id the run's tokenizer uses (its padding of input_ids is masked anyway), else 0."""
    for owner in (getattr(trainer, "processing_class", None), getattr(trainer, "tokenizer", None),
                  getattr(getattr(trainer, "data_collator", None), "tokenizer", None)):
        pad = getattr(owner, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    return 0


def positions_of(model: Any) -> int | None:
    """The longest sequence the model's positions cover (max_position_embeddings), if its config says."""
    from mps_shim.models import config_of

    value = getattr(config_of(model), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def wants_buckets(collator: Any) -> str | None:
    """Why a collator needs no buckets (it already pads every batch to one length), or None."""
    if collator is None:
        return "no data collator"
    if isinstance(collator, BucketingCollator):
        return "already bucketed"
    if getattr(collator, "padding", None) == "max_length" and getattr(collator, "max_length", None):
        return "the collator pads every batch to max_length"
    return None


def install(runtime: Any, trainer: Any) -> Any:
    """Wrap the trainer's collator for Trainer.train (one change line); returns what puts the original back."""
    from mps_shim.preflight import longest_sequence

    collator = getattr(trainer, "data_collator", None)
    if MAX_BUCKETS <= 0 or wants_buckets(collator) is not None:
        return lambda: None
    longest = max(longest_sequence(getattr(trainer, "train_dataset", None), collator) or 0,
                  longest_sequence(getattr(trainer, "eval_dataset", None), collator) or 0)
    buckets = bucket_lengths(longest)
    trainer.data_collator = BucketingCollator(collator, buckets, pad_token_of(trainer), positions_of(trainer.model))
    to = f"to the next of {'/'.join(map(str, buckets))} tokens" if buckets else "to the next power of two tokens"
    runtime.report.change(
        "data collator padding", "to each batch's longest row", to,
        "MPS compiles and keeps a graph for every new batch shape, so each new length adds to the driver's memory "
        "for the rest of the run; the added positions are right padding with attention_mask 0 and labels -100, so "
        "the loss is unchanged",
    )
    runtime.report.update("batch", {"padding_buckets": buckets})

    def restore() -> None:
        trainer.data_collator = collator

    return restore
