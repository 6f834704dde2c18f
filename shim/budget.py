"""The memory budget: how many bytes a run may use on the Apple GPU, and the allocator settings that enforce it.

The only memory code that changes the environment. MPSAllocator refuses an allocation past its "max allowed": the
high watermark ratio (PYTORCH_MPS_HIGH_WATERMARK_RATIO, default 1.7) times Metal's recommendedMaxWorkingSetSize.
torch reads the ratio once, when its allocator starts; afterwards `torch.mps.set_per_process_memory_fraction` moves
the same limit (docs/mps-facts.md). With the limit at the budget, a run that outgrows it gets a clean out-of-memory
error, which the shim recovers from, instead of swapping the machine. These constants are also the simulator's.
"""
from __future__ import annotations

import os
import sys

from mps_shim.log import INFO, WARNING
from mps_shim.units import size_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

HIGH_WATERMARK = "PYTORCH_MPS_HIGH_WATERMARK_RATIO"
LOW_WATERMARK = "PYTORCH_MPS_LOW_WATERMARK_RATIO"
TORCH_DEFAULT_HIGH = 1.7
TORCH_DEFAULT_LOW = 1.4  # on unified memory; a HIGH below it without a LOW fails the allocator at start-up
HIGH_UPPER_BOUND = 2.0
# The soft limit (garbage collection of cached buffers, adaptive commit) keeps torch's own proportion to the hard
# limit (1.4 / 1.7): the allocator behaves as by default, only scaled to the budget, and LOW <= HIGH always holds.
LOW_TO_HIGH = TORCH_DEFAULT_LOW / TORCH_DEFAULT_HIGH


def _ratio_text(value: float) -> str:
    return format(value, ".10g")


def watermark_ratios(budget_bytes: int, recommended_bytes: int) -> tuple[float, float, str | None]:
    """(high, low, why the budget could not be honoured exactly or None) for a budget in bytes.

    high = budget / recommendedMaxWorkingSetSize (1.0 when the budget is the recommended working set), capped at
    torch's upper bound of 2.0; low = high x 1.4/1.7.
    """
    high = budget_bytes / recommended_bytes
    note = None
    if high > HIGH_UPPER_BOUND:
        note = (
            f"the memory limit is {high:.2f}x the recommended working set; torch allows at most "
            f"{HIGH_UPPER_BOUND}x, so the budget is {HIGH_UPPER_BOUND}x"
        )
        high = HIGH_UPPER_BOUND
    return high, high * LOW_TO_HIGH, note


def watermark_settings(
    environ, budget_bytes: int, recommended_bytes: int
) -> tuple[list[tuple[str, str, str]], list[str]]:
    """The watermark variables to set, as (variable, value, reason), and notes; the user's own settings win,
    except that a lone HIGH below torch's default LOW gets a LOW that keeps the allocator alive."""
    high, low, note = watermark_ratios(budget_bytes, recommended_bytes)
    notes = [note] if note else []
    user_high, user_low = environ.get(HIGH_WATERMARK), environ.get(LOW_WATERMARK)
    reason = (
        f"memory budget {size_text(budget_bytes)}: past it the run gets a clean out-of-memory error (which "
        "mps-shim recovers from) instead of swapping the machine"
    )
    if user_high is None and user_low is None:
        return [(HIGH_WATERMARK, _ratio_text(high), reason), (LOW_WATERMARK, _ratio_text(low), reason)], notes
    if user_high is not None and user_low is None:
        try:
            their_high = float(user_high)
        except ValueError:
            return [], notes
        if 0.0 < their_high < TORCH_DEFAULT_LOW:
            return [(
                LOW_WATERMARK, _ratio_text(their_high * LOW_TO_HIGH),
                f"{HIGH_WATERMARK}={user_high} is below the default low watermark {TORCH_DEFAULT_LOW}, which makes "
                "the MPS allocator fail at start-up",
            )], notes
        return [], notes
    if user_high is not None and user_low is not None:
        try:
            if float(user_low) > float(user_high) > 0:
                notes.append(
                    f"{LOW_WATERMARK}={user_low} is above {HIGH_WATERMARK}={user_high}: the MPS allocator will refuse "
                    "to start (invalid low watermark ratio)"
                )
        except ValueError:
            pass
    return [], notes


def recommended_without_torch(facts_or_none, total_bytes: int | None = None) -> int | None:
    """Metal's recommended working set before torch is loaded: the simulated one, else from the machine's memory."""
    if facts_or_none is not None and getattr(facts_or_none, "recommended_max_bytes", None):
        return facts_or_none.recommended_max_bytes
    if total_bytes is None:
        try:
            total_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    from mps_shim.capabilities import recommended_working_set

    return recommended_working_set(total_bytes)


class MemoryBudget:
    """The run's budget in bytes (`bytes`, None until torch is loaded or off an Apple GPU), and the settings that make
    the allocator enforce it."""

    def __init__(self, runtime: Any):
        self.runtime = runtime
        self.bytes: int | None = None
        self._set_by_shim: set[str] = set()

    def before_torch(self) -> None:
        """On an Apple GPU: the watermark variables, before torch's allocator reads them.

        When torch is already imported (a notebook, a late `mps_shim.activate()`), that moment has passed: one line
        says so, and `enforce` applies the limit through set_per_process_memory_fraction once torch is there."""
        runtime = self.runtime
        options = runtime.options
        facts = runtime.facts if options.simulate is not None else None  # simulated facts need no torch
        recommended = recommended_without_torch(facts)
        if recommended is None:
            return
        if facts is not None:  # the simulated Mac: the same decision enforce() makes, capped at its memory
            from mps_shim.plan import memory_budget

            budget = memory_budget(facts, options.memory_limit)[0]
        else:
            budget = options.memory_limit or recommended
        settings, notes = watermark_settings(os.environ, budget, recommended)
        for note in notes:
            runtime.report.note(note, WARNING)
        if not settings:
            return
        if "torch" in sys.modules:
            names = " and ".join(variable for variable, _, _ in settings)
            runtime.report.note(
                f"{names} not set: torch was imported before mps_shim; the budget is applied with "
                "torch.mps.set_per_process_memory_fraction instead (torch's default low watermark stays)",
                WARNING,
            )
            return
        for variable, value, reason in settings:
            runtime.set_environment(variable, value, reason)
            self._set_by_shim.add(variable)

    def enforce(self, torch: Any) -> int | None:
        """Once torch is loaded: make the device's hard limit the budget (if the variables came too late, or the
        recommended working set differs from the estimate made without torch), and say what it is."""
        facts = self.runtime.facts
        self.bytes = self._enforce_on_mps(torch, facts) if facts.is_mps and facts.recommended_max_bytes else None
        self.runtime.report.update("memory", {"budget_bytes": self.bytes})
        return self.bytes

    def _enforce_on_mps(self, torch: Any, facts: Any) -> int:
        from mps_shim.device import MpsMemory
        from mps_shim.plan import memory_budget

        runtime = self.runtime
        simulator = runtime.simulator
        recommended = facts.recommended_max_bytes
        users_high = os.environ.get(HIGH_WATERMARK) if HIGH_WATERMARK not in self._set_by_shim else None
        if runtime.options.memory_limit is None and users_high is not None:
            # The user's own watermark is the budget (0.0: no limit but the machine's memory).
            if simulator is not None:
                return simulator.budget_bytes
            try:
                return int(float(users_high) * recommended) or facts.memory_total_bytes
            except ValueError:
                return recommended
        budget, reason = memory_budget(facts, runtime.options.memory_limit)
        high, _low, _note = watermark_ratios(budget, recommended)
        budget = int(high * recommended)
        if simulator is not None:
            current = simulator.budget_bytes
            if current is None or abs(current - budget) > max(1, budget // 1000):
                simulator.set_memory_fraction(float(high))
            budget = simulator.budget_bytes
        elif users_high is None and HIGH_WATERMARK not in self._set_by_shim or runtime.options.memory_limit is not None:
            # The variables came too late (torch was already loaded), or the limit was turned into a ratio with an
            # estimated working set: the fraction call sets the same hard limit at any time.
            MpsMemory(torch).set_fraction(high)
        level = WARNING if "capped" in reason else INFO
        runtime.report.note(f"memory budget {size_text(budget)} ({reason})", level)
        return budget
