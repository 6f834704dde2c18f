"""The memory of the simulated Apple GPU: MPSAllocator's figures, limit and errors, as the emulated torch has them.

* Memory is counted per storage: views and in-place results share their base's storage and count once. A storage
  stops counting when it dies, which a weakref finalizer on the storage reports. Storages keep their Python object
  while the C++ side holds them (for example, tensors saved for backward), so the finalizer fires when the memory
  really goes, not when the last Python reference does.
* The caching allocator is kept simple. A freed storage's bytes stay "cached" (in `driver_bytes()`, not in
  `allocated_bytes()`). A new allocation no bigger than the cache reuses it. A bigger one needs fresh memory.
* The limit is torch's "max allowed": PYTORCH_MPS_HIGH_WATERMARK_RATIO (default 1.7) times Metal's
  recommendedMaxWorkingSetSize (`facts.recommended_max_bytes`); a ratio of 0.0 lifts torch's limit, so the machine's
  memory becomes the limit. MPSAllocator checks the driver's total (its heaps, live and cached, plus what MPS and
  MPSGraph allocate themselves, `other_bytes`) plus the request against it; before it gives up it releases its cached
  buffers. Going past it raises MPSAllocator's own RuntimeError, word for word (docs/mps-facts.md).

* MPS keeps every MPSGraph it compiled, one per op signature (the op, its inputs' shapes and dtypes), for the life of
  the process: no released torch frees it (docs/mps-facts.md, "Long runs"). `compile_graph(key)` stands for that: the
  first time a signature is seen, `graph_entry_bytes` (a simulation-profile setting, 0 unless asked for) is added to
  `other_bytes`, and `empty_cache` never gives it back.

Approximations: sizes are storage bytes; Metal heaps (8 MiB, 32 MiB and 1 GiB tiers) and buffer alignment are not
modelled, so the driver's total is live + cached + other rather than a sum of heap sizes.
"""
from __future__ import annotations

import re
import struct
import weakref

from mps_shim.budget import HIGH_UPPER_BOUND, HIGH_WATERMARK, TORCH_DEFAULT_HIGH, TORCH_DEFAULT_LOW
from mps_shim.capabilities import max_buffer_length
from mps_shim.log import INFO

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from mps_shim.device import DeviceFacts

# torch's own check, for set_per_process_memory_fraction (torch/mps/__init__.py).
FRACTION_TYPE_ERROR = "Invalid type for fraction argument, must be `float`"

# The leading number that C's strtod reads, which is how MPSAllocator parses the watermark variables: anything
# else reads as 0.0.
_STRTOD_PREFIX = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")


class SimulatedMemory:
    """MPSAllocator of one simulated process."""

    def __init__(self, facts: DeviceFacts, report: Any, watermark_env: tuple[str | None, str | None]):
        self.facts = facts
        self.report = report
        self._watermark_env = watermark_env
        self._allocator_ready = False  # torch sets up MPSAllocator (and checks the watermarks) on first use
        self._high_ratio = _strtod(watermark_env[0], TORCH_DEFAULT_HIGH)
        self._live: dict[int, _Allocation] = {}  # data_ptr -> the storage's allocation on the emulated device
        # Finalizers only append here; the counters change only on the accounting path (see _settle).
        self._freed: list[int] = []
        self._allocated = 0
        self._cached = 0
        self.other_bytes = 0  # MPS's and MPSGraph's own allocations
        self.graph_entry_bytes = 0  # driver memory of one cached MPSGraph (0: the graph cache is not modelled)
        self._graphs: set = set()  # signatures compiled so far
        self.peak_bytes = 0

    def holds(self, ptr: int) -> bool:
        return ptr in self._live

    def start(self) -> None:
        """MPSAllocator's start-up check of the watermark variables, raised with torch's text (docs/mps-facts.md)."""
        if self._allocator_ready:
            return
        high_text, low_text = self._watermark_env
        high = _strtod(high_text, TORCH_DEFAULT_HIGH)
        if not 0.0 <= high <= HIGH_UPPER_BOUND:
            raise RuntimeError(f"invalid high watermark ratio {high:g}")
        low = _strtod(low_text, TORCH_DEFAULT_LOW)
        if not 0.0 <= low <= (high or HIGH_UPPER_BOUND):
            raise RuntimeError(f"invalid low watermark ratio {low:g}")
        self._high_ratio = high
        self._allocator_ready = True

    # -- memory figures ---------------------------------------------------------------------------------------------

    @property
    def budget_bytes(self) -> int | None:
        """torch's "max allowed" (high watermark ratio x recommendedMaxWorkingSetSize).

        With the ratio at 0.0 torch has no limit, so this is the machine's memory instead.
        """
        if self._high_ratio == 0.0:
            return self.facts.memory_total_bytes
        if self.facts.recommended_max_bytes is None:
            return None
        return int(self._high_ratio * self.facts.recommended_max_bytes)

    def allocated_bytes(self) -> int:
        """Bytes of live storages on the simulated device (torch.mps.current_allocated_memory)."""
        self._settle()
        return self._allocated

    def driver_bytes(self) -> int:
        """Live, cached and MPS's own bytes (torch.mps.driver_allocated_memory)."""
        self._settle()
        return self._allocated + self._cached + self.other_bytes

    def reset_peak(self) -> None:
        self._settle()
        self.peak_bytes = self._allocated + self.other_bytes

    def empty_cache(self) -> None:
        """torch.mps.empty_cache: give the cached bytes back."""
        self._settle()
        self._cached = 0

    def compile_graph(self, key: Any) -> None:
        """An op ran with signature `key`: the first time, MPS compiles and keeps its graph (`graph_entry_bytes`)."""
        if key in self._graphs:
            return
        self._graphs.add(key)
        self.other_bytes += self.graph_entry_bytes
        self.peak_bytes = max(self.peak_bytes, self._allocated + self.other_bytes)

    @property
    def graph_entries(self) -> int:
        return len(self._graphs)

    def set_memory_fraction(self, fraction: float) -> None:
        """torch.mps.set_per_process_memory_fraction: the high watermark ratio, with no check against the low one."""
        if not isinstance(fraction, float):
            raise TypeError(FRACTION_TYPE_ERROR)
        if fraction < 0 or fraction > 2:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~2")
        self.start()  # the call reaches the allocator, which starts (and checks the variables) first
        self._high_ratio = fraction

    def memory_report(self) -> dict[str, int | None]:
        self._settle()
        return {
            "allocated_bytes": self._allocated,
            "driver_bytes": self._allocated + self._cached + self.other_bytes,
            "budget_bytes": self.budget_bytes,
            "peak_bytes": self.peak_bytes,
        }

    def place(self, storage: Any, raise_error: bool = True) -> Exception | None:
        """Allocate a storage on the simulated device, or give the error MPSAllocator would raise for it."""
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self._live:
            return None
        nbytes = storage.nbytes()
        error = self._allocate(nbytes)
        if error is not None:
            if raise_error:
                raise error
            return error
        allocation = _Allocation(nbytes)
        self._live[ptr] = allocation
        weakref.finalize(storage, _release, self._live, self._freed, ptr, allocation)
        return None

    def _allocate(self, nbytes: int) -> Exception | None:
        self._settle()
        # MPSAllocator refuses a single buffer of Metal's maxBufferLength or more, before any other check.
        max_buffer = max_buffer_length(self.facts.memory_total_bytes) if self.facts.memory_total_bytes else None
        if max_buffer is not None and nbytes >= max_buffer:
            return RuntimeError(f"Invalid buffer size: {format_size(nbytes, self.facts.torch)}")
        limit = self.budget_bytes
        if limit is not None and self._allocated + self._cached + self.other_bytes + nbytes > limit:
            # The driver's total would pass the limit: MPSAllocator releases its cached buffers before it gives up.
            self._cached = 0
            if self._allocated + self.other_bytes + nbytes > limit:
                return self._out_of_memory(nbytes)
        if nbytes <= self._cached:
            self._cached -= nbytes  # a cached block is reused
        self._allocated += nbytes
        self.peak_bytes = max(self.peak_bytes, self._allocated + self.other_bytes)
        return None

    def _settle(self) -> None:
        """Apply the frees the finalizers reported: the bytes go from allocated to cached.

        Finalizers can run in the middle of any bytecode (through the garbage collector), so they only append to a
        list; the counters change here, on the accounting path, and nowhere else.
        """
        while self._freed:
            nbytes = self._freed.pop()
            self._allocated -= nbytes
            self._cached += nbytes

    def _out_of_memory(self, nbytes: int) -> RuntimeError:
        version = self.facts.torch
        # "MPS allocated" is the allocator's heaps after it released its cache, i.e. the live bytes; "other
        # allocations" the rest of the driver's total: MPS's and MPSGraph's own buffers.
        allocated = format_size(self._allocated, version)
        other = format_size(self.other_bytes, version)
        tried = format_size(nbytes, version)
        if self._high_ratio == 0.0:
            text = (
                f"MPS backend out of memory (MPS allocated: {allocated}, other allocations: {other}). "
                f"Tried to allocate {tried} on private pool."
            )
        else:
            text = (
                f"MPS backend out of memory (MPS allocated: {allocated}, other allocations: {other}, "
                f"max allowed: {format_size(self.budget_bytes, version)}). Tried to allocate {tried} on private pool. "
                f"Use {HIGH_WATERMARK}=0.0 to disable upper limit for memory allocations "
                "(may cause system failure)."
            )
        self.report.event("simulated_oom", text, level=INFO)  # whoever catches it decides what it means
        return RuntimeError(text)


class _Allocation:
    """One storage on the simulated device. Its identity tells a live table entry from a stale one."""

    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int):
        self.nbytes = nbytes


def _release(live: dict, freed: list, ptr: int, allocation: _Allocation) -> None:
    """A storage died (weakref finalizer). The address may already belong to another storage: check identity."""
    if live.get(ptr) is allocation:
        del live[ptr]
    freed.append(allocation.nbytes)


def _strtod(text: str | None, default: float) -> float:
    """Parse a watermark variable as MPSAllocator does (C's strtod: a leading number, else 0.0)."""
    if text is None:
        return default
    match = _STRTOD_PREFIX.match(text)
    return float(match.group(1)) if match else 0.0


# From which torch release MPSAllocator prints " KiB/MiB/GiB" (c10's format_size) instead of its own " KB/MB/GB": 2.8
# (libtorch_cpu.dylib of each release, evidence/torch-macos.json).
BINARY_UNITS_FROM = (2, 8)


def format_size(nbytes: int, torch_version: str) -> str:
    """A size as the emulated torch's MPSAllocator prints it: '1024 bytes', '242.48 MiB' or '9.07 GB'."""
    major, minor = (int(part) for part in torch_version.split(".")[:2])
    if (major, minor) >= BINARY_UNITS_FROM:
        units, value = ("KiB", "MiB", "GiB"), float(nbytes)
    else:
        # The old MPSAllocator::format_size converted the size to a C float first.
        units, value = ("KB", "MB", "GB"), struct.unpack("f", struct.pack("f", nbytes))[0]
    if nbytes <= 1024:
        return f"{nbytes} bytes"
    if nbytes <= 1024**2:
        return f"{value / 1024:.2f} {units[0]}"
    if nbytes <= 1024**3:
        return f"{value / 1024**2:.2f} {units[1]}"
    return f"{value / 1024**3:.2f} {units[2]}"
