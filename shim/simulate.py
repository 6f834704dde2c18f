"""The simulated Apple GPU: an Apple-silicon Mac's memory limits and refusals, computed on the CPU.

Under MPS_SHIM_SIMULATE nothing runs on an Apple GPU: every tensor is a CPU tensor. The simulator makes the run meet
the limits and refusals a real Mac of the emulated description would impose (interface.md section 4; the facts are in
reference/mps-version-matrix.md section C).

The model of the device
-----------------------
* A Mac's model lives on the GPU once it is moved there. Here, `adopt(module)` stands for that move: it counts the
  module's parameters and buffers, and from then on every tensor that any torch op of this process allocates counts
  while it lives. This covers activations saved for backward, gradients, optimizer state and temporaries.
  It works through a TorchDispatchMode that is entered once, at the first adopt. A process that never places a model
  pays nothing. The autograd engine carries the mode into backward, so gradients are counted too.
* Memory is counted per storage: views and in-place results share their base's storage and count once. A storage
  stops counting when it dies, which a weakref finalizer on the storage reports. Storages keep their Python object
  while the C++ side holds them (for example, tensors saved for backward), so the finalizer fires when the memory
  really goes, not when the last Python reference does.
* The caching allocator is kept simple. A freed storage's bytes stay "cached" (they are in `driver_bytes()`, not in
  `allocated_bytes()`). A new allocation no bigger than the cache reuses it. A bigger one needs fresh memory; if that
  would pass the limit, the whole cache is released first, as MPSAllocator does before it gives up. So the driver
  total never goes past the limit, and `empty_cache()` drops the cache.
* The limit is torch's "max allowed": PYTORCH_MPS_HIGH_WATERMARK_RATIO (default 1.7) times Metal's
  recommendedMaxWorkingSetSize (`facts.recommended_max_bytes`). A ratio of 0.0 lifts torch's limit, so the machine's
  memory becomes the limit. Going past it raises MPSAllocator's own RuntimeError, word for word.

Approximations
--------------
* Sizes are storage bytes. Metal's heap alignment and MPSGraph's own scratch buffers ("other allocations" in the
  out-of-memory text, reported here as 0 bytes) are not modelled.
* Tensors that existed before the first adopt are CPU-side data and never count, nor do views or in-place results
  of them. A batch built on the CPU after the first adopt counts. On a Mac it would be copied to the GPU, so that
  comes to the same thing.
* float64 is never refused: the CPU legitimately uses it (for example, in the shim's own checks), and here a CPU
  tensor cannot be told apart from one on the simulated device.
* A storage resized in place keeps the size it had when first seen.
* Only ops on the thread that first adopted a model are seen: dispatch modes are thread-local. Autograd's backward
  is the exception, because it runs with the caller's thread-local state.
"""
from __future__ import annotations

import logging
import re
import struct
import warnings
import weakref

TYPE_CHECKING = False  # typing itself is not imported: `shim/` modules load at the start of every process
if TYPE_CHECKING:
    from typing import Any

    from mps_shim.device import DeviceFacts

from mps_shim.budget import HIGH_UPPER_BOUND, HIGH_WATERMARK, LOW_WATERMARK, TORCH_DEFAULT_HIGH, TORCH_DEFAULT_LOW

# torch's own check, for set_per_process_memory_fraction (torch/mps/__init__.py).
FRACTION_TYPE_ERROR = "Invalid type for fraction argument, must be `float`"

# The leading number that C's strtod reads, which is how MPSAllocator parses the watermark variables: anything
# else reads as 0.0.
_STRTOD_PREFIX = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")


class Simulator:
    """The emulated Apple GPU of one process (see the module docstring for the model)."""

    def __init__(self, facts: DeviceFacts, runtime: Any):
        self.facts = facts
        self.runtime = runtime
        self._torch = None
        self._mode = None
        self._watermark_env: tuple[str | None, str | None] = (None, None)
        self._reset_state()

    def _reset_state(self) -> None:
        self._allocator_ready = False  # torch sets up MPSAllocator (and checks the watermarks) on first use
        self._high_ratio = TORCH_DEFAULT_HIGH
        self._live: dict[int, _Allocation] = {}  # data_ptr -> the storage's allocation on the emulated device
        # Finalizers only append here; the counters change only on the accounting path (see _settle).
        self._freed: list[int] = []
        self._allocated = 0
        self._cached = 0
        self.peak_bytes = 0
        self._aliasing_ops: dict[Any, bool] = {}

    # -- life cycle -------------------------------------------------------------------------------------------------

    def install(self, torch: Any) -> None:
        """Get ready once torch is imported. The dispatch mode waits for the first adopt."""
        if self._torch is not None:
            return
        import os

        self._torch = torch
        self._tensor_type = torch.Tensor
        self._refuse_bf16 = not self.facts.capabilities.bf16_tensors
        # torch reads these variables once, when its allocator starts; so does the simulator.
        self._watermark_env = (os.environ.get(HIGH_WATERMARK), os.environ.get(LOW_WATERMARK))
        self._high_ratio = _strtod(self._watermark_env[0], TORCH_DEFAULT_HIGH)
        # The budget itself is said by the memory guard, which decides it; this line says what is emulated.
        self.runtime.report.note(
            f"simulated Apple GPU: macOS {self.facts.macos}, torch {self.facts.torch} behaviour, "
            f"{self.facts.memory_total_bytes / 2**30:g} GiB unified memory; the CPU computes"
        )

    def uninstall(self) -> None:
        """Leave the dispatch mode and forget all accounting. Safe to call more than once."""
        if self._mode is not None:
            _exit_mode(self._mode)
            self._mode = None
        self._torch = None
        self._reset_state()

    # -- placing a model on the simulated device --------------------------------------------------------------------

    def adopt(self, module: Any) -> None:
        """Place a module on the simulated GPU: count its parameters and buffers, and every allocation from now on."""
        torch = self._require_torch()
        self._init_allocator()
        tensors = [*module.parameters(), *module.buffers()]
        if self._refuse_bf16 and any(t.dtype is torch.bfloat16 for t in tensors):
            # On a Mac, moving bf16 weights to MPS is where bf16 fails.
            raise TypeError(self.facts.capabilities.bf16_tensor_error)
        if self._mode is None:
            self._mode = _enter_mode(self)
        for tensor in tensors:
            self._place(tensor.untyped_storage())

    def _require_torch(self) -> Any:
        if self._torch is None:
            raise RuntimeError("the simulated Apple GPU is not installed (Simulator.install(torch) comes first)")
        return self._torch

    def _init_allocator(self) -> None:
        """MPSAllocator's start-up check of the watermark variables, raised with torch's text (matrix C(e))."""
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
        """Live plus cached bytes (torch.mps.driver_allocated_memory)."""
        self._settle()
        return self._allocated + self._cached

    def reset_peak(self) -> None:
        self._settle()
        self.peak_bytes = self._allocated

    def empty_cache(self) -> None:
        """torch.mps.empty_cache: give the cached bytes back."""
        self._settle()
        self._cached = 0

    def set_memory_fraction(self, fraction: float) -> None:
        """torch.mps.set_per_process_memory_fraction: the high watermark ratio, with no check against the low one."""
        if not isinstance(fraction, float):
            raise TypeError(FRACTION_TYPE_ERROR)
        if fraction < 0 or fraction > 2:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~2")
        self._init_allocator()  # the call reaches the allocator, which starts (and checks the variables) first
        self._high_ratio = fraction

    def memory_report(self) -> dict[str, int | None]:
        self._settle()
        return {
            "allocated_bytes": self._allocated,
            "driver_bytes": self._allocated + self._cached,
            "budget_bytes": self.budget_bytes,
            "peak_bytes": self.peak_bytes,
        }

    # -- autocast ---------------------------------------------------------------------------------------------------

    def autocast(self, dtype: Any, enabled: bool = True) -> Any:
        """What `torch.autocast("mps", dtype=dtype, enabled=enabled)` gives on the emulated Mac (matrix C(a)).

        Where MPS autocast runs, CPU autocast does the same casts for the simulated GPU.
        """
        torch = self._require_torch()
        # Before torch 2.5 MPS has no autocast at all. torch.autocast says so even when enabled=False.
        unsupported_device = self.facts.capabilities.autocast_refusal("fp16")
        if unsupported_device is not None and unsupported_device[0] == "error":
            raise RuntimeError(unsupported_device[1])
        if enabled and self.autocast_allowed(dtype):
            return torch.autocast("cpu", dtype=dtype)
        return torch.autocast("cpu", enabled=False)

    def autocast_allowed(self, dtype: Any) -> bool:
        """Whether `torch.autocast("mps", dtype)` runs on the emulated Mac. Where it does not, this raises the
        RuntimeError torch raises, or gives torch's UserWarning and returns False (torch then disables autocast)."""
        torch = self._require_torch()
        names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
        refusal = self.facts.capabilities.autocast_refusal(names.get(dtype, "fp32"))
        if refusal is None:
            return True
        kind, text = refusal
        if kind == "error":
            raise RuntimeError(text)
        warnings.warn(text, UserWarning, stacklevel=3)
        return False

    # -- the accounting, called by the dispatch mode for every op -----------------------------------------------------

    def _dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        out = func(*args, **kwargs)
        error = self._account_outputs(func, out)
        if error is not None:
            # The output must not outlive the failed op. A reference from this frame would survive in the traceback.
            del out
            raise error
        return out

    def _account_outputs(self, func: Any, out: Any) -> Exception | None:
        if isinstance(out, self._tensor_type):
            return self._account(func, out)
        if isinstance(out, (tuple, list)):  # multi-output ops, possibly nested (lists of tensors in a tuple)
            for item in out:
                error = self._account_outputs(func, item)
                if error is not None:
                    return error
        return None

    def _account(self, func: Any, tensor: Any) -> Exception | None:
        """Count one op output. Returns the error the emulated device raises for it, if any."""
        try:
            storage = tensor.untyped_storage()
        except NotImplementedError:  # sparse and other storage-less layouts: nothing MPS training allocates
            return None
        ptr = storage.data_ptr()
        on_device = ptr in self._live
        if not on_device and (ptr == 0 or self._aliases_input(func)):
            return None  # no memory (empty or meta), or a view or in-place result of CPU-side data
        if self._refuse_bf16 and tensor.dtype is self._torch.bfloat16:
            return TypeError(self.facts.capabilities.bf16_tensor_error)
        if on_device:
            return None  # a view or in-place result of a storage already counted
        return self._place(storage, raise_error=False)

    def _aliases_input(self, func: Any) -> bool:
        """Whether the op's outputs are views of, or the same tensors as, its inputs (from its schema)."""
        aliases = self._aliasing_ops.get(func)
        if aliases is None:
            aliases = any(ret.alias_info is not None for ret in func._schema.returns)
            self._aliasing_ops[func] = aliases
        return aliases

    def _place(self, storage: Any, raise_error: bool = True) -> Exception | None:
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
        # Metal refuses a single buffer above the device's maxBufferLength. On Apple silicon that limit is close to
        # recommendedMaxWorkingSetSize; the simulator uses the latter.
        max_buffer = self.facts.recommended_max_bytes
        if max_buffer is not None and nbytes >= max_buffer:
            return RuntimeError(f"Invalid buffer size: {format_size(nbytes, self.facts.torch)}")
        if nbytes <= self._cached:
            self._cached -= nbytes  # a cached block is reused
        else:
            limit = self.budget_bytes
            if limit is not None and self._allocated + self._cached + nbytes > limit:
                self._cached = 0  # MPSAllocator releases its cached buffers before it gives up
            if limit is not None and self._allocated + nbytes > limit:
                return self._out_of_memory(nbytes)
        self._allocated += nbytes
        if self._allocated > self.peak_bytes:
            self.peak_bytes = self._allocated
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
        # "MPS allocated" is the allocator's heaps after it released its cache, i.e. the live bytes. "other
        # allocations" are MPSGraph's and Metal's own buffers, which the simulator does not model.
        allocated = format_size(self._allocated, version)
        other = format_size(0, version)
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
        self.runtime.report.event("simulated_oom", text, level=logging.INFO)  # whoever catches it decides what it means
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


def _enter_mode(simulator: Simulator) -> Any:
    """Enter the accounting dispatch mode on this thread and return it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SimulatedDeviceMemory(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return simulator._dispatch(func, args, kwargs or {})

    mode = SimulatedDeviceMemory()
    mode.__enter__()
    return mode


def _exit_mode(mode: Any) -> None:
    """Leave the mode, even if other modes were entered on top of it since (they are put back, in order)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    stack = _get_current_dispatch_mode_stack()
    if mode not in stack:
        return  # entered on another thread, or already gone
    above = stack[stack.index(mode) + 1 :]
    for other in reversed(above):
        other.__exit__(None, None, None)
    mode.__exit__(None, None, None)
    for other in above:
        other.__enter__()


def _strtod(text: str | None, default: float) -> float:
    """Parse a watermark variable as MPSAllocator does (C's strtod: a leading number, else 0.0)."""
    if text is None:
        return default
    match = _STRTOD_PREFIX.match(text)
    return float(match.group(1)) if match else 0.0


# From which torch release MPSAllocator prints KiB/MiB/GiB (c10's format_size) instead of its own KB/MB/GB: the
# reference leaves the boundary UNVERIFIED (matrix C(f)). This is an assumption.
BINARY_UNITS_FROM = (2, 6)


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
