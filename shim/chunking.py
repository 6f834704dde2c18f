"""Running one batch as several smaller pieces: the loop that training and evaluation share, and the tensor helpers
it needs (rows of a batch, slices, label-token counts, putting outputs back together).

A piece that runs out of memory (shim/oom.py) is handed to the caller's `recover`, which returns the pieces still to
run: usually the failed rows split in two. Pieces run in order, so the rows of a batch keep their order.
"""
from __future__ import annotations

import math

from mps_shim.oom import first_line, is_out_of_memory

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable


class Piece:
    """Rows start..stop of a batch; `excluded`: parameters whose gradient from these rows was already added by an
    attempt that failed half-way through backward."""

    __slots__ = ("start", "stop", "excluded")

    def __init__(self, start: int, stop: int, excluded: frozenset = frozenset()):
        self.start, self.stop, self.excluded = start, stop, excluded

    @property
    def rows(self) -> int:
        return self.stop - self.start


def chunk_sizes(total: int, micro_batch: int) -> list[int]:
    """`total` rows in the fewest chunks of at most `micro_batch`, as equal as possible (7 by 4 -> [4, 3])."""
    if total <= 0:
        return []
    chunks = math.ceil(total / max(1, micro_batch))
    base, extra = divmod(total, chunks)
    return [base + 1] * extra + [base] * (chunks - extra)


def pieces(start: int, rows: int, micro_batch: int, excluded: frozenset = frozenset()) -> list[Piece]:
    """Rows start..start+rows as pieces of at most `micro_batch` (sizes from chunk_sizes)."""
    result = []
    for size in chunk_sizes(rows, micro_batch):
        result.append(Piece(start, start + size, excluded))
        start += size
    return result


def run_in_chunks(
    rows: int,
    micro_batch: int,
    run: Callable[[Piece], Any],
    recover: Callable[[Piece, str, list[Piece]], list[Piece]],
    retry_single_rows: bool = True,
) -> list[tuple[Piece, Any]]:
    """Run the rows of a batch as pieces; (piece, output) for each piece whose `run` returned something other than
    None. An out-of-memory in `run` calls recover(piece, first line of the error, pieces still waiting), which returns
    the pieces to run next or raises; with retry_single_rows False, one on a single row is raised as it is."""
    pending = pieces(0, rows, micro_batch)
    results = []
    while pending:
        piece = pending.pop(0)
        try:
            out = run(piece)
        except Exception as error:
            if not is_out_of_memory(error) or (piece.rows == 1 and not retry_single_rows):
                raise
            failure = first_line(error)
        else:
            if out is not None:
                results.append((piece, out))
            continue
        # Here, after the except block, the error and its traceback (which holds the failed piece's tensors) are gone.
        pending = recover(piece, failure, pending)
    return results


def inputs_and_caller(wrapped: Callable, args: tuple, kwargs: dict) -> tuple[Any, Callable]:
    """The `inputs` of a training_step/prediction_step call (model, inputs, ...), and a function that makes the same
    call with other inputs."""
    if "inputs" in kwargs:
        return kwargs["inputs"], lambda other: wrapped(*args, **{**kwargs, "inputs": other})
    return args[1], lambda other: wrapped(*args[:1], other, *args[2:], **kwargs)


def batch_rows(inputs: Any) -> int | None:
    """Rows of a batch: the first dimension its tensors share."""
    import torch

    rows = None
    for value in inputs.values() if hasattr(inputs, "values") else ():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            if rows is None:
                rows = value.shape[0]
            elif value.shape[0] != rows:
                return None
    return rows


def slice_inputs(inputs: Any, start: int, stop: int, rows: int) -> dict:
    import torch

    return {
        key: value[start:stop] if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows
        else value
        for key, value in inputs.items()
    }


def label_tokens(labels: Any, ignore_index: int = -100) -> Any:
    """Per row: the tokens that count in a causal LM loss (labels after the one-token shift, not ignore_index)."""
    return (labels[..., 1:] != ignore_index).reshape(labels.shape[0], -1).sum(dim=1)


def token_counts(inputs: Any) -> tuple[list[int], int]:
    """Label tokens per row (after the causal shift) and their total; ([], 0) without 2-D labels."""
    labels = inputs.get("labels") if hasattr(inputs, "get") else None
    if labels is None or getattr(labels, "dim", lambda: 0)() < 2:
        return [], 0
    counts = label_tokens(labels).tolist()
    return counts, sum(counts)


def share_of_batch(piece: Piece, counts: list[int], total_tokens: int, rows: int) -> float:
    """A piece's share of the batch's loss: its label tokens over the batch's, or its rows without labels."""
    if total_tokens:
        return sum(counts[piece.start:piece.stop]) / total_tokens
    return piece.rows / rows


def concat_nested(parts: list) -> Any:
    """Concatenate per-chunk outputs (tensors, tuples/lists/dicts of them, None) along the batch dimension."""
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


def combine_predictions(results: list[tuple[Piece, Any]], counts: list[int], rows: int) -> tuple:
    """(loss, logits, labels) of the whole batch from its chunks: the loss as the batch's token mean (each chunk's
    mean weighted by its label tokens), logits and labels concatenated."""
    total = sum(counts) if counts else 0
    loss = None
    if all(out[0] is not None for _, out in results):
        for piece, out in results:
            share = share_of_batch(piece, counts, total, rows)
            if share == 0:
                continue
            loss = out[0] * share if loss is None else loss + out[0] * share
    logits = concat_nested([out[1] for _, out in results])
    labels = concat_nested([out[2] for _, out in results])
    return loss, logits, labels
