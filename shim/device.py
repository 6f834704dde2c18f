"""Everything the shim knows about the machine comes from here.

On a Mac it asks torch and Metal, cheaply and safely: a probe that fails means "unsupported", never a crash. Under
MPS_SHIM_SIMULATE it describes the emulated Mac instead, from the same capability table (capabilities.py). The few
calls that exist only on a Mac (`torch.mps.*`) are made through `MpsMemory`, which takes the torch module as an
argument so tests can hand it a fake.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, replace
from typing import Any

from mps_shim.capabilities import MpsCapabilities, mps_capabilities, recommended_working_set
from mps_shim.config import Options


@dataclass(frozen=True)
class DeviceFacts:
    type: str  # "mps", "cuda" or "cpu": the accelerator the run is meant for
    simulated: bool
    macos: str | None
    torch: str  # the torch version whose MPS behaviour applies (the emulated one when simulating)
    memory_total_bytes: int | None
    recommended_max_bytes: int | None  # Metal's recommendedMaxWorkingSetSize
    capabilities: MpsCapabilities | None  # None off MPS
    probe_notes: tuple[str, ...] = ()  # where a live probe on a real Mac contradicted the table (the probe wins)

    @property
    def is_mps(self) -> bool:
        return self.type == "mps"

    @property
    def compute_device(self) -> str:
        """Where tensors really go: the simulated Apple GPU computes on the CPU."""
        return "cpu" if self.simulated else self.type

    def as_report(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "simulated": self.simulated,
            "macos": self.macos,
            "torch": self.torch,
            "memory_total_bytes": self.memory_total_bytes,
            "recommended_max_bytes": self.recommended_max_bytes,
        }


def simulated_facts(options: Options) -> DeviceFacts:
    profile = options.simulate
    assert profile is not None
    return DeviceFacts(
        type="mps",
        simulated=True,
        macos=profile.macos,
        torch=profile.torch,
        memory_total_bytes=profile.memory_bytes,
        recommended_max_bytes=recommended_working_set(profile.memory_bytes),
        capabilities=mps_capabilities(profile.torch, profile.macos),
    )


def detect(options: Options, torch: Any = None) -> DeviceFacts:
    """The facts for this process. Imports torch unless simulating (callers only ask once torch is loaded)."""
    if options.simulate is not None:
        return simulated_facts(options)
    if torch is None:
        import torch
    version = torch.__version__.split("+")[0]
    if _mps_available(torch):
        return probe_mps(torch)
    total = _memory_total()
    if torch.cuda.is_available():
        return DeviceFacts("cuda", False, None, version, total, None, None)
    return DeviceFacts("cpu", False, None, version, total, None, None)


def probe_mps(torch: Any) -> DeviceFacts:
    """The real Apple GPU: the table for this torch and macOS, corrected by live probes (a bf16 tensor, autocast in
    each dtype); where a probe contradicts the table, the probe wins and a note says so."""
    version = torch.__version__.split("+")[0]
    macos = platform.mac_ver()[0] or "0"
    table = mps_capabilities(version, macos)
    capabilities, notes = table, []
    if table.bf16_tensors and not _bf16_works(torch):
        capabilities = replace(capabilities, bf16_tensors=False, bf16_tensor_error="bf16 probe failed on this Mac")
        notes.append("the table says bf16 tensors work here; the probe found they do not")
    autocast_dtypes = []
    for name in ("bf16", "fp16"):
        works = _autocast_works(torch, name)
        expected = name in table.autocast_dtypes
        if works is None:
            works = expected  # the probe could not run: the table stands
        elif works != expected:
            notes.append(f"the table says {name} autocast {'runs' if expected else 'does not run'} here; the probe "
                         f"found it {'runs' if works else 'does not'}")
        if works and (name != "bf16" or capabilities.bf16_tensors):
            autocast_dtypes.append(name)
    capabilities = replace(capabilities, autocast_dtypes=tuple(autocast_dtypes))
    total = _memory_total()
    recommended = MpsMemory(torch).recommended_max() or (recommended_working_set(total) if total else None)
    return DeviceFacts("mps", False, macos, version, total, recommended, capabilities, tuple(notes))


def _mps_available(torch: Any) -> bool:
    try:
        return bool(torch.backends.mps.is_available() and torch.backends.mps.is_built())
    except Exception:
        return False


def _bf16_works(torch: Any) -> bool:
    try:
        probe = torch.ones(2, dtype=torch.bfloat16, device="mps")
        return bool((probe @ probe).item() == 2.0)
    except Exception:
        return False


def _autocast_works(torch: Any, name: str) -> bool | None:
    """Whether torch.autocast("mps") really computes a matmul in `name`; None when the probe cannot run."""
    import warnings

    autocast = getattr(torch, "autocast", None)
    if autocast is None:
        return None
    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[name])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a refusal is a warning plus a disabled autocast: the dtype tells
            with autocast("mps", dtype=dtype):
                probe = torch.ones(4, 4, device="mps")
                return (probe @ probe).dtype == dtype
    except Exception:
        return False


def _memory_total() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:
        return None


class MpsMemory:
    """torch.mps's (and torch.accelerator's) memory calls, each one optional: torch versions differ and some calls exist
    only on a Mac."""

    def __init__(self, torch: Any):
        self._torch = torch
        self._mps = getattr(torch, "mps", None)

    def _call(self, name: str, *args) -> tuple[bool, Any]:
        """(whether the call ran, its result)."""
        function = getattr(self._mps, name, None)
        if function is None:
            return False, None
        try:
            return True, function(*args)
        except Exception:
            return False, None

    def recommended_max(self) -> int | None:
        return self._call("recommended_max_memory")[1]  # torch >= 2.5

    def allocated(self) -> int | None:
        return self._call("current_allocated_memory")[1]

    def driver(self) -> int | None:
        return self._call("driver_allocated_memory")[1]

    def empty_cache(self) -> bool:
        return self._call("empty_cache")[0]

    def _accelerator_stat(self, key: str) -> int | None:
        """One of torch.accelerator's allocator statistics (torch 2.13+ serves them for MPS), or None."""
        stats = getattr(getattr(self._torch, "accelerator", None), "memory_stats", None)
        if stats is None:
            return None
        try:
            value = stats().get(key)
        except Exception:
            return None
        return int(value) if value is not None else None

    def reserved(self) -> int | None:
        """The allocator's heaps, cached buffers included."""
        return self._accelerator_stat("reserved_bytes.all.current")

    def peak_reserved(self) -> int | None:
        return self._accelerator_stat("reserved_bytes.all.peak")

    def reset_peak(self) -> bool:
        reset = getattr(getattr(self._torch, "accelerator", None), "reset_peak_memory_stats", None)
        if reset is None:
            return False
        try:
            reset()
        except Exception:
            return False
        return True

    def set_fraction(self, fraction: float) -> bool:
        # torch insists on a float in [0, 2]; the fraction is of recommendedMaxWorkingSetSize.
        return self._call("set_per_process_memory_fraction", float(fraction))[0]


def distributed_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)
