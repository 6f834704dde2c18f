"""What counts as out of memory: the errors a run can recover from by computing a batch in smaller pieces.

The texts are the allocators' own (docs/mps-facts.md has where each comes from). accelerate recognises the MPS text
only from 1.15, so the shim decides for itself.
"""
from __future__ import annotations

OUT_OF_MEMORY_TEXTS = (
    "MPS backend out of memory",  # any size units: KB/MB/GB (torch <= 2.7) or KiB/MiB/GiB (2.8+)
    "Invalid buffer size",  # one Metal buffer above the device's maxBufferLength
    "CUDA out of memory",
    "XPU out of memory",
    "HIP out of memory",
    "DefaultCPUAllocator: can't allocate memory",
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception is a device (or CPU allocator) out-of-memory, whatever accelerate's version thinks."""
    if isinstance(error, MemoryError):
        return True
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(error).__mro__):  # torch.OutOfMemoryError, any alias
        return True
    if not isinstance(error, RuntimeError):
        return False
    text = str(error)
    return any(marker in text for marker in OUT_OF_MEMORY_TEXTS)


def first_line(error: BaseException) -> str:
    """The error's first line, for a log line or an event."""
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__
