"""When to give the Apple GPU's cached memory back during training: a pure decision, applied by shim/memory_guard.py.

On a Mac the GPU's cache is the machine's RAM: what MPSAllocator keeps cached after a step is memory every other app
goes without. It is worth keeping when the next step reuses it, and worth releasing when the driver's total runs far
above the live tensors. Only the allocator's cached buffers can be released (torch.mps.empty_cache): MPS's own
allocations, the compiled-graph cache among them, stay (docs/mps-facts.md, "Long runs"). A real Mac's figures do not
tell the two apart, so the part of `driver - allocated` that the last release left (`floor`) counts as not
releasable, and is measured again after every release.
"""
from __future__ import annotations

# Release when the releasable cache is larger than the live tensors and than this share of the usable budget ...
IDLE_SHARE = 0.25
# ... at most once in this many training steps: a step reuses the cache of the step before, so releasing it every step
# would only make each step allocate its memory afresh.
IDLE_EVERY = 50
OVER_BUDGET, IDLE = "over_budget", "idle"


def releasable(allocated: int, driver: int, floor: int) -> int:
    """What an empty_cache is expected to give back: the driver's total less the live tensors and the floor."""
    return max(0, driver - allocated - floor)


def release_reason(
    allocated: int, driver: int, floor: int, usable: int | None, steps_since: int | None = None
) -> tuple[str, str] | None:
    """Why the cache should be emptied now, as (OVER_BUDGET or IDLE, the reason), or None. `usable`: the budget less
    headroom (None: no budget); `steps_since`: training steps since the last IDLE release (None: none yet)."""
    if usable is not None and driver > usable:
        return OVER_BUDGET, "the driver's total is over the usable budget"
    if steps_since is not None and steps_since < IDLE_EVERY:
        return None
    cached = releasable(allocated, driver, floor)
    if usable is not None and cached > allocated and cached > IDLE_SHARE * usable:
        return IDLE, (
            f"the driver holds {cached / 2**20:.0f} MiB of cached memory, more than the live tensors and than "
            f"{IDLE_SHARE:.0%} of the usable budget"
        )
    return None
