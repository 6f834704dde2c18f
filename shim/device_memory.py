"""The memory figures the memory guard reads: the Apple GPU's (real through device.MpsMemory, or simulated) and the
machine's (swap and memory pressure, through psutil)."""
from __future__ import annotations

from mps_shim.units import MIB

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable


class DeviceMemory:
    """The Apple GPU's memory figures, real (torch through device.MpsMemory) or simulated, behind one face.

    What decides an out-of-memory is not the live tensors (`allocated`, current_allocated_memory) but the driver's
    total: whole Metal heaps, cached buffers and MPS's and MPSGraph's own allocations (driver_allocated_memory), which
    MPSAllocator checks against its limit after releasing its cache (docs/mps-facts.md). So `in_use` (what the
    allocator cannot give back) and `peak` are on that figure. On a real Mac the peak comes from torch's allocator
    statistics where they exist for MPS (torch.accelerator memory stats, torch 2.13+), else from samples of the
    driver's total at every tensor saved for or used in backward (`sampling()`) and at every `sample()`."""

    def __init__(self, runtime: Any, torch: Any):
        from mps_shim.device import MpsMemory

        self.runtime = runtime
        self.torch = torch
        self.simulator = runtime.simulator
        self.mps = MpsMemory(torch)
        self._peak = 0

    @property
    def budget(self) -> int | None:
        if self.simulator is not None:
            return self.simulator.budget_bytes
        return self.runtime.budget.bytes

    def allocated(self) -> int:
        """Live tensors."""
        if self.simulator is not None:
            return self.simulator.allocated_bytes()
        return self.mps.allocated() or 0

    def driver(self) -> int:
        """The driver's total, cached buffers included."""
        if self.simulator is not None:
            return self.simulator.driver_bytes()
        return self.mps.driver() or 0

    def in_use(self) -> int:
        """What the allocator holds and would not release before failing: the driver's total less its cache (on a real
        Mac the driver's total itself, the cache being empty right after `empty_cache`)."""
        if self.simulator is not None:
            return self.simulator.in_use_bytes()
        return self.driver()

    def empty_cache(self) -> None:
        import gc

        gc.collect()
        if self.simulator is not None:
            self.simulator.empty_cache()
        else:
            self.mps.empty_cache()

    def device_work(self) -> Any:
        """A context whose ops are the GPU's work (the simulated device's graph cache counts them)."""
        import contextlib

        if self.simulator is not None:
            return self.simulator.device_work()
        return contextlib.nullcontext()

    def sample(self) -> int:
        now = self.in_use()
        self._peak = max(self._peak, now)
        return now

    def reset_peak(self) -> None:
        if self.simulator is not None:
            self.simulator.reset_peak()
        else:
            self.mps.reset_peak()
        self._peak = self.in_use()

    def peak(self) -> int:
        if self.simulator is not None:
            return self.simulator.peak_bytes
        # The allocator's own peak of its heaps, plus what MPS holds beside them now.
        counted = self.mps.peak_reserved()
        if counted is None:
            return self._peak
        beside_heaps = max(0, self.driver() - (self.mps.reserved() or 0))
        return max(self._peak, counted + beside_heaps)

    def sampling(self) -> Any:
        """A context in which a real device's allocation is sampled at every saved tensor (for a peak)."""
        import contextlib

        if self.simulator is not None:
            return contextlib.nullcontext()

        def pack(tensor):
            self.sample()
            return tensor

        def unpack(tensor):
            self.sample()
            return tensor

        return self.torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _psutil_reading() -> tuple[int, float]:
    import psutil

    return int(psutil.swap_memory().used), float(psutil.virtual_memory().percent)


class PressureWatch:
    """Warns once when the machine starts swapping (swap grew by `swap_growth` bytes since the start) or memory use
    passes `percent`; again only after it went back to normal. `read` returns (swap used bytes, memory percent)."""

    def __init__(self, read: Callable[[], tuple[int, float]] | None = None, swap_growth: int = 256 * MIB,
                 percent: float = 92.0):
        self.read = read or _psutil_reading
        self.swap_growth = swap_growth
        self.percent = percent
        self.baseline: int | None = None
        self.warned = False

    def check(self) -> str | None:
        try:
            swap, percent = self.read()
        except Exception:
            return None
        if self.baseline is None:
            self.baseline = swap
        grew = swap - self.baseline
        if grew >= self.swap_growth or percent >= self.percent:
            if self.warned:
                return None
            self.warned = True
            what = []
            if grew >= self.swap_growth:
                what.append(f"swap grew by {grew / MIB:.0f} MiB since training started")
            if percent >= self.percent:
                what.append(f"system memory is {percent:.0f}% used")
            return (
                "; ".join(what) + ": the machine is short of memory; training slows down. Close other apps or "
                "lower --memory-limit"
            )
        self.warned = False
        self.baseline = min(self.baseline, swap)
        return None
