"""The simulated Apple GPU's CPU fallbacks: ops the emulated torch release has no MPS kernel for warn as torch warns.

On a Mac with PYTORCH_ENABLE_MPS_FALLBACK=1, an op without an MPS kernel runs torch's `mps_fallback`
(aten/src/ATen/mps/MPSFallback.mm): TORCH_WARN_ONCE("The operator '<op>' is not currently supported on the MPS backend
and will fall back to run on the CPU. This may have performance implications."), then the op on the CPU. The warning
reaches Python as a UserWarning; TORCH_WARN_ONCE gives it for the first such op of the process only, unless
`torch.set_warn_always(True)`, and then for every call (the wheels' mps_fallback calls
`c10::WarningUtils::get_warnAlways` before its once-guard; docs/mps-facts.md).

Here the simulator's dispatch mode sees each op after autograd, as the MPS backend would, and an op of the emulated
release's list (shim/cpu_fallback_ops.py, read from the wheels) with an input on the simulated device warns the same
way. Approximations: ops that a CompositeExplicitAutograd kernel calls from inside are not seen (the mode sees the
outer op only); the installed torch decides which ops a model calls, the emulated release only which of them have an
MPS kernel; torch's message ends with "(Triggered internally at .../MPSFallback.mm:LINE.)", this one does not.
"""
from __future__ import annotations

import warnings

from packaging.version import Version

from mps_shim.capabilities import major_minor
from mps_shim.cpu_fallback_ops import FALLBACKS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

WARNING = (
    "The operator '{op}' is not currently supported on the MPS backend and will fall back to run on the CPU. "
    "This may have performance implications."
)


def fallback_ops(torch_release: str) -> dict[str, str]:
    """{op as dispatched: op as the warning names it} for the ops with no MPS kernel in this torch release."""
    release = major_minor(torch_release)
    ops = {}
    for (first, last), entries in FALLBACKS.items():
        if Version(first) <= release <= Version(last):
            for entry in entries:
                seen, _, reported = entry.partition(">")
                ops[seen] = reported or seen
    return ops


class SimulatedFallbacks:
    """Called by the simulator's dispatch mode before each op runs."""

    def __init__(self, torch: Any, torch_release: str, simulator: Any):
        self._torch = torch
        self._ops = fallback_ops(torch_release)
        self._simulator = simulator
        self._decided: dict[Any, str | None] = {}
        self._warned_once = False  # TORCH_WARN_ONCE's static

    def _reported_name(self, func: Any) -> str | None:
        name = self._decided.get(func, False)
        if name is False:
            schema = func._schema
            namespace, _, base = schema.name.partition("::")
            key = base + (f".{schema.overload_name}" if schema.overload_name else "")
            # foreach ops: the CPU's route (clip_grad_norm_ takes it for CPU tensors), never MPS's default one
            reported = self._ops.get(key) if namespace == "aten" and not key.startswith("_foreach_") else None
            name = f"aten::{reported}" if reported else None
            self._decided[func] = name
        return name

    def _on_device(self, tensor: Any) -> bool:
        try:
            return self._simulator.memory.holds(tensor.untyped_storage().data_ptr())
        except NotImplementedError:  # storage-less layouts
            return False

    def check(self, func: Any, args: tuple, kwargs: dict) -> None:
        name = self._reported_name(func)
        if name is None:
            return
        from torch.utils._pytree import tree_leaves

        tensor = self._torch.Tensor
        if not any(isinstance(x, tensor) and self._on_device(x) for x in tree_leaves((args, kwargs))):
            return  # CPU-side data: runs on the CPU anyway, no fallback
        if self._torch.is_warn_always_enabled() or not self._warned_once:
            self._warned_once = self._warned_once or not self._torch.is_warn_always_enabled()
            warnings.warn(WARNING.format(op=name), UserWarning, stacklevel=2)
