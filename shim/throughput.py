"""Tokens per second of a training run, and a warning when they fall and stay down (a Mac throttling when hot).

Training time is the wall time between the starts of consecutive training steps (the step, the optimizer step and
the data loading), less the time spent in evaluation and saving (`paused()`). Tokens are the batch's real tokens
(attention_mask ones; every input_ids position without a mask), so padding, the shim's buckets included, never counts.

Throttling: the steps are grouped into windows of WINDOW_STEPS; a window's rate is its tokens over its time. The
first window (compilation, warm-up) is not compared. When THROTTLED_WINDOWS windows in a row run below
THROTTLED_SHARE of the run's best window, one `throughput_drop` event says so. `clock` is injectable, so the tests
drive it without sleeping.
"""
from __future__ import annotations

import time

from mps_shim.log import WARNING

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

STATE = "_mps_shim_throughput"  # the attribute of a Trainer that holds its Throughput
CLOCK = time.perf_counter  # the clock a Throughput reads unless given one
WINDOW_STEPS = 20
THROTTLED_SHARE = 0.5  # below half of the run's best window ...
THROTTLED_WINDOWS = 3  # ... for this many windows in a row: sustained, not a slow batch or a save


def batch_tokens(inputs: Any) -> int:
    """Real tokens of a batch: attention_mask ones, else every input_ids position; 0 when neither is there."""
    get = getattr(inputs, "get", None)
    if get is None:
        return 0
    for key in ("attention_mask", "input_ids"):
        value = get(key)
        if hasattr(value, "numel"):
            return int(value.sum()) if key == "attention_mask" else int(value.numel())
    return 0


def throttled(rates: list[float], share: float = THROTTLED_SHARE, windows: int = THROTTLED_WINDOWS) -> str | None:
    """Why the last `windows` window rates mean a sustained drop against the best of the earlier ones, or None."""
    compared = rates[1:]  # the first window warms up
    if len(compared) < windows + 1:
        return None
    recent, best = compared[-windows:], max(compared[:-windows])
    if best <= 0 or max(recent) >= share * best:
        return None
    now = sum(recent) / len(recent)
    return (
        f"tokens per second fell to {now:.0f}, {now / best:.0%} of this run's best {best:.0f}, for the last "
        f"{windows * WINDOW_STEPS} training steps: the Mac may be throttling (heat, Low Power Mode) or busy with "
        "other work; cooling it, plugging it in and closing other apps bring the speed back"
    )


class Throughput:
    def __init__(self, report: Any, clock: Callable[[], float] | None = None):
        self.report = report
        self.clock = clock or CLOCK
        self.tokens = 0
        self.seconds = 0.0
        self._last_start: float | None = None
        self._pending_tokens: int | None = None  # tokens of the step running now (None: between steps)
        self._paused = 0.0
        self._window = [0, 0.0, 0]  # tokens, seconds, steps
        self.rates: list[float] = []
        self._since_log = [0, 0.0]
        self.warned = False

    def step_started(self, inputs: Any, step: int | None = None) -> None:
        self._close(step)
        self._pending_tokens = batch_tokens(inputs)

    def _close(self, step: int | None = None) -> None:
        """Count the time since the last mark (less pauses) and the running step's tokens; mark now."""
        now = self.clock()
        if self._last_start is not None:
            self._add(self._pending_tokens, max(0.0, now - self._last_start - self._paused), step)
        self._last_start, self._paused, self._pending_tokens = now, 0.0, None

    def _add(self, pending: int | None, seconds: float, step: int | None) -> None:
        tokens = pending or 0
        self.tokens += tokens
        self.seconds += seconds
        self._since_log[0] += tokens
        self._since_log[1] += seconds
        window = self._window
        window[0] += tokens
        window[1] += seconds
        window[2] += pending is not None  # the time from a log line to the next step is no step of its own
        if window[2] >= WINDOW_STEPS:
            self.rates.append(window[0] / window[1] if window[1] > 0 else 0.0)
            self._window = [0, 0.0, 0]
            why = None if self.warned else throttled(self.rates)
            if why:
                self.warned = True
                self.report.event("throughput_drop", why, step=step, level=WARNING)

    def end(self, step: int | None = None) -> None:
        """Training ended: count the last step, put the run's figures in the report."""
        self._close(step)
        self._last_start = None
        self.report.update("throughput", self.summary())

    def paused(self) -> Any:
        """A context whose time (evaluation, saving) is not training time."""
        import contextlib

        @contextlib.contextmanager
        def pause():
            start = self.clock()
            try:
                yield
            finally:
                self._paused += self.clock() - start

        return pause()

    def add_to_logs(self, logs: dict, step: int | None = None) -> None:
        """`throughput/tokens_per_second` since the previous log line, and the run's figures in the report. The
        Trainer logs after the optimizer step: the step that ran is complete."""
        self._close(step)
        tokens, seconds = self._since_log
        if seconds > 0:
            logs["throughput/tokens_per_second"] = round(tokens / seconds, 1)
        self._since_log = [0, 0.0]
        self.report.update("throughput", self.summary())

    def summary(self) -> dict:
        return {
            "tokens": self.tokens,
            "training_seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds > 0 else None,
            "best_window_tokens_per_second": round(max(self.rates[1:] or self.rates or [0.0]), 1) or None,
        }


def of(runtime: Any, trainer: Any) -> Throughput:
    """The trainer's Throughput, made on first use."""
    meter = getattr(trainer, STATE, None)
    if meter is None:
        meter = Throughput(runtime.report)
        setattr(trainer, STATE, meter)
    return meter
