"""Ops that run on the CPU instead of the Apple GPU: named and counted, not hidden.

With PYTORCH_ENABLE_MPS_FALLBACK=1 (shim/runtime.py sets it), an op MPS has no kernel for runs on the CPU, with its
inputs and outputs copied each time: the run only gets slower. torch says so through TORCH_WARN_ONCE in its
mps_fallback (aten/src/ATen/mps/MPSFallback.mm), a UserWarning for the first such op of the whole process; every
later call, of that op or any other, is silent. In every wheel 2.2-2.15, mps_fallback asks
`c10::WarningUtils::get_warnAlways()` before its once-guard (docs/mps-facts.md), so with `torch.set_warn_always(True)`
each call warns, and those warnings come back to Python (also from backward, whose warnings the autograd engine
replays in the calling thread).

So, on an Apple GPU (real or simulated): warn-always is switched on (one report change), a warnings filter lets the
fallback warning through every time, and a hook on `warnings._showwarnmsg` counts each one by op. The user sees the
warning once per op (not once per process); the report gets an event for each new op, a `cpu_fallbacks` section
with the counts, and the end of the run one summary line. What stays unseen: calls made while a program's own
`warnings.catch_warnings()`/`simplefilter("ignore")` block is active (the filter is put back in front when the
Trainer starts training); `complete` in the section says whether the counts cover every call.
Other TORCH_WARN_ONCE warnings may now repeat where they come from different lines of Python code; Python's default
filter still shows each once per line.
"""
from __future__ import annotations

import os
import re
import warnings

from mps_shim.log import WARNING

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from mps_shim.report import Report

FALLBACK_VARIABLE = "PYTORCH_ENABLE_MPS_FALLBACK"
# The warning of every release 2.2-2.15 (evidence/torch-macos.json, cpu_fallback.warning_regex).
WARNING_RE = re.compile(
    r"The operator '(?P<op>.+?)' is not currently supported on the MPS backend and will fall back to run on the CPU\."
)
_FILTER_MESSAGE = r"The operator '.+' is not currently supported on the MPS backend"


def fallback_enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether torch registers the CPU fallback: it reads the variable once, as an integer, when it loads."""
    value = (os.environ if environ is None else environ).get(FALLBACK_VARIABLE)
    try:
        return value is not None and int(value) != 0
    except ValueError:
        return False


class FallbackWatch:
    """The CPU fallbacks of one process."""

    def __init__(self, report: Report, torch_release: str):
        self.report = report
        self.torch_release = torch_release
        self.counts: dict[str, int] = {}
        self.complete = True
        self.show = True  # each op's first warning reaches the program's stderr
        self._torch = None
        self._was_warn_always = None
        self._original_show = None

    # -- life cycle -------------------------------------------------------------------------------------------------

    def install(self, torch: Any) -> None:
        if self._torch is not None or not fallback_enabled():
            return
        self._torch = torch
        set_always = getattr(torch, "set_warn_always", None)
        if set_always is None:
            self.complete = False  # only torch's first fallback of the process is observable
        else:
            self._was_warn_always = torch.is_warn_always_enabled()
            if not self._was_warn_always:
                set_always(True)
                self.report.change(
                    "torch.set_warn_always", False, True,
                    "torch warns only for the first op of the process that falls back to the CPU; with this, every "
                    "fallback is counted (each op is still shown once)",
                )
        self.arm()
        self._original_show = warnings._showwarnmsg
        warnings._showwarnmsg = self._show
        self.report.update("cpu_fallbacks", self.section())

    def arm(self) -> None:
        """Put the filter that lets every fallback warning through in front of the program's own filters."""
        if self._torch is None:
            return
        entry = ("always", re.compile(_FILTER_MESSAGE, re.I), UserWarning, None, 0)
        if warnings.filters and warnings.filters[0] == entry:
            return
        if entry in warnings.filters:
            warnings.filters.remove(entry)
        warnings.filterwarnings("always", message=_FILTER_MESSAGE, category=UserWarning)

    def uninstall(self) -> None:
        if self._torch is None:
            return
        if warnings._showwarnmsg == self._show:
            warnings._showwarnmsg = self._original_show
        for entry in [f for f in warnings.filters if f[0] == "always" and getattr(f[1], "pattern", None) == _FILTER_MESSAGE]:
            warnings.filters.remove(entry)
        mutated = getattr(warnings, "_filters_mutated", None)  # Python's cache of the filters
        if mutated is not None:
            mutated()
        if self._was_warn_always is False:
            self._torch.set_warn_always(False)
        self._torch = None

    # -- counting -------------------------------------------------------------------------------------------------

    def _show(self, message: Any) -> None:
        match = WARNING_RE.search(str(message.message))
        if match is None:
            self._original_show(message)
            return
        op = match.group("op")
        first = op not in self.counts
        self.counts[op] = self.counts.get(op, 0) + 1
        if first:
            if self.show:
                self._original_show(message)
            self.report.event(
                "cpu_fallback",
                f"{op} has no MPS kernel in torch {self.torch_release}: it runs on the CPU, with its tensors copied "
                "there and back on every call",
            )
            self.report.update("cpu_fallbacks", self.section())

    def section(self) -> dict[str, Any]:
        """The report's `cpu_fallbacks`: each op with its number of calls; `complete` is False when only torch's first
        warning of the process could be seen."""
        return {
            "observed": "every call" if self.complete else "the first fallback of the process only",
            "complete": self.complete,
            "ops": dict(sorted(self.counts.items(), key=lambda item: -item[1])),
        }

    def summary(self) -> str | None:
        """One line for the end of the run, or None when nothing fell back."""
        if not self.counts:
            return None
        ops = ", ".join(f"{op} ({n} call{'s' if n != 1 else ''})" for op, n in self.section()["ops"].items())
        return f"ran on the CPU instead of the Apple GPU: {ops}"

    def finish(self) -> None:
        """End of the run: the section as it stands, and the summary line."""
        if self._torch is None and not self.counts:
            return
        self.report.update("cpu_fallbacks", self.section())
        line = self.summary()
        if line:
            self.report.note(line, WARNING)
