"""MPS bugs that give a fine-tune wrong numbers without any error, by torch release. Pure data and pure functions.

Each entry: what goes wrong, what triggers it in a Trainer + PEFT fine-tune, the torch releases affected (major.minor,
inclusive), where that range comes from, and what the shim does about it. docs/mps-facts.md ("Silent wrong
results") gives the sources and says which ranges were checked against the wheels.
"""
from __future__ import annotations

from dataclasses import dataclass

from packaging.version import Version

from mps_shim.capabilities import major_minor


@dataclass(frozen=True)
class KnownBug:
    key: str
    title: str  # a few words, for the one-line warning
    summary: str  # what goes wrong
    trigger: str  # what in a fine-tune hits it
    first: str  # first affected torch release
    last: str | None  # last affected release; None: no fixed release is known
    source: str  # the pytorch issue and the fix
    range_from: str  # how the range was established
    shim: str  # what the shim does about it
    short_shim: str  # the same in a few words, for the one-line warning

    def affects(self, torch_version: str) -> bool:
        release = major_minor(torch_version)
        return Version(self.first) <= release and (self.last is None or release <= Version(self.last))

    @property
    def releases(self) -> str:
        return f"{self.first}-{self.last}" if self.last else f"{self.first} and later (no fix known)"


KNOWN_BUGS = (
    KnownBug(
        key="sdpa_fully_masked_rows",
        title="NaN attention for fully masked rows",
        summary="scaled_dot_product_attention returns NaN for a query row whose keys are all masked",
        trigger="left padding: a padding position attends to nothing, its NaN reaches every row in the next layer "
                "(0 x NaN), and the loss turns NaN",
        first="2.2", last="2.8",
        source="pytorch/pytorch#156707, fixed by PR #157727 (merged 2025-07-14)",
        range_from="the wheels: 2.2-2.4 have no MPS SDPA kernel and no _safe_softmax (the composite path's softmax "
                   "gives NaN); 2.5-2.8's MPS graph has no all-masked check; from 2.9 it has (equal/reductionAnd "
                   "selectors)",
        shim="pad training batches on the right, where no row is fully masked: shim/padding.py turns a left-padding "
             "tokenizer to the right for training where this bug applies",
        short_shim="pad training batches on the right",
    ),
    KnownBug(
        key="addcdiv_noncontiguous",
        title="wrong addcdiv (AdamW) on non-contiguous tensors",
        summary="addcdiv/addcdiv_ give wrong results for non-contiguous tensors",
        trigger="the AdamW step (addcdiv_) on a parameter that is a transposed or otherwise non-contiguous view",
        first="2.2", last="2.3",
        source="pytorch/pytorch#118115, fixed by PR #124442 (merged 2024-04)",
        range_from="the fix's merge date, before the 2.4 branch cut; the wheels were not checked",
        shim="warns only",
        short_shim="no workaround",
    ),
    KnownBug(
        key="sdpa_vector_noncontiguous",
        title="wrong attention for non-contiguous q/k/v with short queries",
        summary="scaled_dot_product_attention is wrong for permuted (non-contiguous) q/k/v with batch > 1 and up to 8 "
                "query tokens",
        trigger="evaluation or generation with short queries; attention implementations that pass permuted views",
        first="2.8", last="2.11",
        source="pytorch/pytorch#181133, fixed by PR #181151",
        range_from="the sdpa_vector Metal kernels in the wheels (present from 2.8; evidence/torch-macos.json)",
        shim="q/k/v are made contiguous before the call (patches/sdpa.py)",
        short_shim="avoided: q/k/v made contiguous",
    ),
    KnownBug(
        key="backward_large_after_shape_change",
        title="wrong gradients past ~32K tokens after a change of batch shape",
        summary="gradients 1,000-100,000x too large when batch x sequence passes about 32,768 tokens after a "
                "step of another shape",
        trigger="batches of varying length (padding to each batch's longest row) with more than ~32K tokens each",
        first="2.2", last=None,
        source="pytorch/pytorch#177116 (open)",
        range_from="the issue is open and names no first release: every release covered is treated as affected",
        shim="warns only; fewer distinct batch shapes make it rarer",
        short_shim="no workaround; open issue",
    ),
)


def affecting(torch_version: str) -> list[KnownBug]:
    """The known bugs of this torch release, in table order."""
    return [bug for bug in KNOWN_BUGS if bug.affects(torch_version)]


def warning_line(torch_version: str) -> str | None:
    """One line for the start of a run and for doctor, or None when no known bug affects this release."""
    bugs = affecting(torch_version)
    if not bugs:
        return None
    parts = "; ".join(f"{bug.title} ({bug.source.split(',')[0].split(' ')[0]}, {bug.short_shim})" for bug in bugs)
    return f"known silent wrong results of torch {torch_version} on MPS: {parts}"
