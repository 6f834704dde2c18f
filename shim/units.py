"""Sizes as people read them: the one formatter of the shim's own lines (the simulator prints torch's own format)."""
from __future__ import annotations

MIB = 2**20
GIB = 2**30
TIB = 2**40


def size_text(size: int | None) -> str:
    """'2.00 TiB', '1.50 GiB' from a GiB up, '51.5 MiB' below; 'unknown' for None."""
    if size is None:
        return "unknown"
    if abs(size) >= TIB:
        return f"{size / TIB:.2f} TiB"
    return f"{size / GIB:.2f} GiB" if abs(size) >= GIB else f"{size / MIB:.1f} MiB"
