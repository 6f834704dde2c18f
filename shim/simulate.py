"""The simulated Apple GPU: an Apple-silicon Mac's refusals and memory limits, computed on the CPU.

Under MPS_SHIM_SIMULATE nothing runs on an Apple GPU: every tensor is a CPU tensor. The simulator makes the run meet
the refusals and limits a real Mac of the emulated description would impose, from the same capability table as the
real-device path (shim/capabilities.py) and the facts in docs/mps-facts.md.

* A Mac's model lives on the GPU once it is moved there. Here, `adopt(module)` stands for that move: it counts the
  module's parameters and buffers, and from then on every tensor that any torch op of this process allocates counts
  while it lives (shim/simulated_memory.py keeps the figures). This covers activations saved for backward, gradients,
  optimizer state and temporaries. It works through a TorchDispatchMode entered once, at the first adopt; a process
  that never places a model pays nothing. The autograd engine carries the mode into backward, so gradients count too.
* bf16 tensors, and autocast in a dtype the emulated torch/macOS lacks, are refused with torch's own texts.
* MPS's graph cache: inside `device_work()` (the Trainer's training and evaluation steps and the memory preflight,
  entered by shim/memory_guard.py and shim/preflight.py), every op's signature (the op, its arguments' shapes, dtypes
  and other values) is handed to SimulatedMemory.compile_graph, which charges `graph_entry_bytes` per new signature.
  Outside it (the data collator, the shim's own checks) ops run on CPU-side data on a real Mac and compile nothing.

Approximations
--------------
* Tensors that existed before the first adopt are CPU-side data and never count, nor do views or in-place results
  of them. A batch built on the CPU after the first adopt counts; on a Mac it would be copied to the GPU, which comes
  to the same thing.
* float64 is never refused: the CPU legitimately uses it (for example, in the shim's own checks), and here a CPU
  tensor cannot be told apart from one on the simulated device.
* A storage resized in place keeps the size it had when first seen.
* Only ops on the thread that first adopted a model are seen: dispatch modes are thread-local. Autograd's backward
  is the exception, because it runs with the caller's thread-local state.
"""
from __future__ import annotations

import warnings

from mps_shim.budget import HIGH_WATERMARK, LOW_WATERMARK
from mps_shim.simulated_memory import SimulatedMemory

TYPE_CHECKING = False  # typing itself is not imported: `shim/` modules load at the start of every process
if TYPE_CHECKING:
    from typing import Any

    from mps_shim.device import DeviceFacts


class Simulator:
    """The emulated Apple GPU of one process (see the module docstring for the model)."""

    def __init__(self, facts: DeviceFacts, runtime: Any):
        self.facts = facts
        self.runtime = runtime
        self._torch = None
        self._mode = None
        self._autocast_original = None
        self.memory = SimulatedMemory(facts, runtime.report, (None, None))
        self._aliasing_ops: dict[Any, bool] = {}
        self._device_work = 0  # depth of device_work(): ops inside compile MPS graphs
        self.fallbacks = None  # ops without an MPS kernel in the emulated torch (shim/simulated_fallback.py)

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
        watermarks = (os.environ.get(HIGH_WATERMARK), os.environ.get(LOW_WATERMARK))
        self.memory = SimulatedMemory(self.facts, self.runtime.report, watermarks)
        options = getattr(self.runtime, "options", None)
        self.memory.graph_entry_bytes = graph_entry_bytes(getattr(options, "simulate", None))
        self._emulate_mps_autocast(torch)
        from mps_shim.fallbacks import fallback_enabled

        if fallback_enabled():  # read by torch once, when it loads; without it such ops raise (not simulated)
            from mps_shim.simulated_fallback import SimulatedFallbacks

            self.fallbacks = SimulatedFallbacks(torch, self.facts.torch, self)
        # The budget itself is said by the memory budget, which decides it; this line says what is emulated.
        self.runtime.report.note(
            f"simulated Apple GPU: macOS {self.facts.macos}, torch {self.facts.torch} behaviour, "
            f"{self.facts.memory_total_bytes / 2**30:g} GiB unified memory; the CPU computes"
        )

    def uninstall(self) -> None:
        """Leave the dispatch mode and forget all accounting. Safe to call more than once."""
        if self._mode is not None:
            _exit_mode(self._mode)
            self._mode = None
        if self._autocast_original is not None:
            autocast, original = self._autocast_original
            autocast.__init__ = original
            self._autocast_original = None
        self._torch = None
        self.fallbacks = None
        self.memory = SimulatedMemory(self.facts, self.runtime.report, (None, None))
        self._aliasing_ops = {}

    # -- placing a model on the simulated device --------------------------------------------------------------------

    def adopt(self, module: Any) -> None:
        """Place a module on the simulated GPU: count its parameters and buffers, and every allocation from now on."""
        torch = self._require_torch()
        self.memory.start()
        tensors = [*module.parameters(), *module.buffers()]
        if self._refuse_bf16 and any(t.dtype is torch.bfloat16 for t in tensors):
            # On a Mac, moving bf16 weights to MPS is where bf16 fails.
            raise TypeError(self.facts.capabilities.bf16_tensor_error)
        if self._mode is None:
            self._mode = _enter_mode(self)
        for tensor in tensors:
            self.memory.place(tensor.untyped_storage())

    def _require_torch(self) -> Any:
        if self._torch is None:
            raise RuntimeError("the simulated Apple GPU is not installed (Simulator.install(torch) comes first)")
        return self._torch

    def device_work(self) -> Any:
        """A context in which ops are the GPU's work: each new op signature adds a cached MPSGraph."""
        import contextlib

        @contextlib.contextmanager
        def scope():
            self._device_work += 1
            try:
                yield
            finally:
                self._device_work -= 1

        return scope()

    # -- memory figures: the emulated MPSAllocator (shim/simulated_memory.py) ----------------------------------------

    @property
    def budget_bytes(self) -> int | None:
        return self.memory.budget_bytes

    @property
    def peak_bytes(self) -> int:
        return self.memory.peak_bytes

    @peak_bytes.setter
    def peak_bytes(self, value: int) -> None:
        self.memory.peak_bytes = value

    def allocated_bytes(self) -> int:
        return self.memory.allocated_bytes()

    def driver_bytes(self) -> int:
        return self.memory.driver_bytes()

    def in_use_bytes(self) -> int:
        """What the allocator holds and would not release before failing: live storages and MPS's own bytes."""
        return self.memory.allocated_bytes() + self.memory.other_bytes

    def reset_peak(self) -> None:
        self.memory.reset_peak()

    def empty_cache(self) -> None:
        self.memory.empty_cache()

    def set_memory_fraction(self, fraction: float) -> None:
        self.memory.set_memory_fraction(fraction)

    def memory_report(self) -> dict[str, int | None]:
        return self.memory.memory_report()

    # -- autocast: torch.autocast("mps", ...) as the emulated torch has it ---------------------------------------------

    def _emulate_mps_autocast(self, torch: Any) -> None:
        """From now on `torch.autocast("mps", ...)` raises, warns and disables as the emulated torch/macOS would
        (shim/capabilities.py), and where it runs, CPU autocast does the same casts for the simulated GPU."""
        autocast = torch.amp.autocast_mode.autocast
        original = autocast.__init__
        simulator = self

        def __init__(context, device_type, dtype=None, enabled=True, cache_enabled=None):
            if device_type == "mps":
                dtype = dtype if dtype is not None else torch.float16  # MPS autocast's default dtype
                enabled = simulator.mps_autocast_enabled(dtype, enabled)
                device_type = "cpu"
            original(context, device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

        __init__.__wrapped__ = original
        autocast.__init__ = __init__
        self._autocast_original = (autocast, original)

    def mps_autocast_enabled(self, dtype: Any, enabled: bool) -> bool:
        """Whether `torch.autocast("mps", dtype, enabled)` autocasts on the emulated Mac. Where it does not, this raises
        the RuntimeError torch raises, or gives torch's UserWarning and returns False, as torch does (before 2.10 even
        for enabled=False)."""
        from mps_shim.capabilities import autocast_checks_when_disabled

        torch = self._require_torch()
        names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
        refusal = self.facts.capabilities.autocast_refusal(names.get(dtype, "fp32"))
        if refusal is None or not (enabled or autocast_checks_when_disabled(self.facts.torch)):
            return enabled
        kind, text = refusal
        if kind == "error":
            raise RuntimeError(text)
        warnings.warn(text, UserWarning, stacklevel=3)
        return False

    # -- the accounting, called by the dispatch mode for every op -----------------------------------------------------

    def _dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if self._device_work and self.memory.graph_entry_bytes:
            self.memory.compile_graph(self._signature(func, args, kwargs))
        if self.fallbacks is not None:
            self.fallbacks.check(func, args, kwargs)
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
        on_device = self.memory.holds(ptr)
        if not on_device and (ptr == 0 or self._aliases_input(func)):
            return None  # no memory (empty or meta), or a view or in-place result of CPU-side data
        if self._refuse_bf16 and tensor.dtype is self._torch.bfloat16:
            return TypeError(self.facts.capabilities.bf16_tensor_error)
        if on_device:
            return None  # a view or in-place result of a storage already counted
        return self.memory.place(storage, raise_error=False)

    def _aliases_input(self, func: Any) -> bool:
        """Whether the op's outputs are views of, or the same tensors as, its inputs (from its schema)."""
        aliases = self._aliasing_ops.get(func)
        if aliases is None:
            aliases = any(ret.alias_info is not None for ret in func._schema.returns)
            self._aliasing_ops[func] = aliases
        return aliases

    def _signature(self, func: Any, args: tuple, kwargs: dict) -> tuple:
        """What MPS keys a cached graph on: the op and its arguments, tensors by shape and dtype."""
        tensor_type = self._tensor_type

        def part(value: Any) -> Any:
            if isinstance(value, tensor_type):
                return (tuple(value.shape), value.dtype)
            if isinstance(value, (list, tuple)):
                return tuple(part(item) for item in value)
            try:
                hash(value)
            except TypeError:
                return repr(value)
            return value

        return (func, part(args), tuple(sorted((k, part(v)) for k, v in kwargs.items())))


def graph_entry_bytes(profile: Any) -> int:
    """The simulation profile's cost of one cached MPSGraph (`graph_entry=`), 0 when it does not ask for one."""
    return int(getattr(profile, "graph_entry_bytes", 0) or 0)


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


