"""When to give the Apple GPU's cached memory back during training: a pure decision, applied by shim/memory_guard.py.

On a Mac the GPU's cache is the machine's RAM: what MPSAllocator keeps cached after a step is memory every other app
goes without. It is worth keeping when the next step reuses it, and worth releasing when the driver's total runs far
above the live tensors. Only the allocator's cached buffers can be released (torch.mps.empty_cache): MPS's own
allocations, the compiled-graph cache among them, stay (docs/mps-facts.md, "Long runs"). A real Mac's figures do not
tell the two apart, so the part of `driver - allocated` that the last release left (`floor`) counts as not
releasable, and is measured again after every release.
"""
from __future__ import annotations

# Release when the releasable cache is larger than the live tensors and than this share of the usable budget.
IDLE_SHARE = 0.25


def releasable(allocated: int, driver: int, floor: int) -> int:
    """What an empty_cache is expected to give back: the driver's total less the live tensors and the floor."""
    return max(0, driver - allocated - floor)


def release_reason(allocated: int, driver: int, floor: int, usable: int | None) -> str | None:
    """Why the cache should be emptied now, or None. `usable`: the budget less headroom (None: no budget)."""
    if usable is not None and driver > usable:
        return "the driver's total is over the usable budget"
    cached = releasable(allocated, driver, floor)
    if usable is not None and cached > allocated and cached > IDLE_SHARE * usable:
        return (
            f"the driver holds {cached / 2**20:.0f} MiB of cached memory, more than the live tensors and than "
            f"{IDLE_SHARE:.0%} of the usable budget"
        )
    return None
