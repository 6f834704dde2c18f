"""Activation: one Runtime per process owns the run's state and starts everything else.

What it owns, and who else may change it: the options (read-only after activation), the device facts (detected
once), the report (an output: written, never read back), the patch registry, the simulated GPU (when simulating),
the precision (shim/precision.py: the only code that changes the plan), the memory budget (shim/budget.py: the only
memory code that changes the environment), and the environment variables the shim set (restored on deactivate).
docs/architecture.md draws the path of one run through these.
"""
from __future__ import annotations

import atexit
import os
import sys

from mps_shim.budget import MemoryBudget
from mps_shim.config import PLAN_ONLY, Options, kill_switch, load_options
from mps_shim.errors import PlanReached, ShimConfigError
from mps_shim.hooks import when_imported
from mps_shim.precision import PrecisionState
from mps_shim.registry import Registry
from mps_shim.log import WARNING, set_level
from mps_shim.report import Report

TYPE_CHECKING = False  # typing itself is not imported: `import mps_shim` runs at the start of every process
if TYPE_CHECKING:
    from typing import Any

    from mps_shim.device import DeviceFacts

# Read by torch once, when it loads (docs/mps-facts.md): setting it later, as accelerate does, has no effect.
FALLBACK_VARIABLE = "PYTORCH_ENABLE_MPS_FALLBACK"


class Runtime:
    def __init__(self, options: Options):
        self.options = options
        self.report = Report(options.report)
        self.registry = Registry(self)
        self._facts: DeviceFacts | None = None
        self.simulator = None
        self.fallbacks = None  # ops that run on the CPU instead of the Apple GPU (shim/fallbacks.py)
        self.precision = PrecisionState(self)
        self.budget = MemoryBudget(self)
        self._saved_environ: dict[str, str | None] = {}
        self.plan_only = bool(os.environ.get(PLAN_ONLY))  # set by `mps-shim plan` for every process it starts
        if self.plan_only:
            from mps_shim.sizing import plan_sizes

            plan_sizes(os.environ)  # a bad MPS_SHIM_PLAN_SIZES stops here, before any work (ShimConfigError)
        self.training_reached = False

    @property
    def facts(self) -> DeviceFacts:
        if self._facts is None:
            from mps_shim.device import detect

            self._facts = detect(self.options)
            self.report.update("device", {**self._facts.as_report(), "distributed": False})
        return self._facts

    @property
    def on_mac(self) -> bool:
        """An Apple GPU, real or simulated, known without importing torch."""
        return self.options.simulate is not None or (sys.platform == "darwin" and os.uname().machine == "arm64")

    @property
    def changes_numbers(self) -> bool:
        """Whether the shim may change how the run computes: only on an Apple GPU, real or simulated."""
        return self.facts.is_mps

    def place(self, model: Any) -> None:
        """The model is on the device now: the simulated one starts counting its memory and refusing what MPS would."""
        if self.simulator is not None:
            self.simulator.adopt(model)
        if self.fallbacks is not None:
            self.fallbacks.arm()  # a script may have silenced warnings since torch loaded (e.g. filterwarnings("ignore"))

    def set_environment(self, variable: str, value: str, reason: str) -> None:
        """Set a variable for this process and its children, as one change of the run; deactivate restores it."""
        self._saved_environ.setdefault(variable, os.environ.get(variable))
        os.environ[variable] = value
        self.report.change(f"environment {variable}", None, value, reason)

    def start(self) -> None:
        set_level(self.options.log_level)
        if self.on_mac:
            self._set_before_torch(FALLBACK_VARIABLE, "1", "ops MPS lacks run on the CPU instead of stopping the run")
            self.budget.before_torch()  # the watermarks, before torch's allocator reads them
        when_imported("torch", self._on_torch_import)  # first: the patches on torch may need the simulator
        self.registry.install()

    def _set_before_torch(self, variable: str, value: str, reason: str) -> None:
        """Set an environment variable that torch reads only while it loads; say so if that moment has passed."""
        if os.environ.get(variable) is not None:
            return  # the user's own setting wins
        if "torch" in sys.modules:
            self.report.note(f"{variable} not set: torch was imported before mps_shim ({reason})", WARNING)
            return
        self.set_environment(variable, value, reason)

    def _on_torch_import(self, torch: Any) -> None:
        if _runtime is not self:  # left by an earlier activation
            return
        facts = self.facts
        if not facts.is_mps:
            self.report.note(
                f"no Apple GPU here (device: {facts.type}) and no simulation: nothing that changes the numbers of "
                "this run is changed"
            )
        if facts.simulated:
            from mps_shim.simulate import Simulator

            self.simulator = Simulator(facts, self)
            self.simulator.install(torch)
        if facts.is_mps:
            self.budget.enforce(torch)
            self._watch_mps(torch, facts.torch)

    def _watch_mps(self, torch: Any, release: str) -> None:
        """CPU fallbacks counted (shim/fallbacks.py); the known silent wrong-result bugs of this torch said once."""
        from mps_shim.fallbacks import FallbackWatch
        from mps_shim.known_bugs import warning_line

        self.fallbacks = FallbackWatch(self.report, release)
        self.fallbacks.install(torch)
        bugs = warning_line(release)
        if bugs:
            self.report.note(bugs, WARNING)

    def reach_training(self, fits: bool = True) -> None:
        """Trainer.train is about to train (fits) or its memory plan failed (not fits). Under `mps-shim plan` the plan
        is printed here, and a plan that fits stops the process with PlanReached."""
        self.training_reached = True
        if self.fallbacks is not None:
            self.fallbacks.arm()  # the program may have replaced the warning filters since torch loaded
        if not self.plan_only:
            return
        self._print_plan()
        if fits:
            raise PlanReached("training would start here; the plan is above, nothing was trained")

    def _print_plan(self, ending: str | None = None) -> None:
        from mps_shim.report import render_plan
        from mps_shim.sizing import render

        data = self.report.as_dict()
        lines = [render_plan(data), *render(data.get("sizing")), *([f"  {ending}"] if ending else [])]
        print("\n".join(lines), flush=True)
        self.report.write(always=True)

    def stop(self) -> None:
        self.registry.uninstall()
        if self.fallbacks is not None:
            self.fallbacks.uninstall()
            self.fallbacks = None
        if self.simulator is not None:
            self.simulator.uninstall()
            self.simulator = None
        for variable, value in self._saved_environ.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
        self.report.set_active(False)
        self.report.write()

    def at_exit(self) -> None:
        if self.fallbacks is not None:
            self.fallbacks.finish()  # the cpu_fallbacks section and its summary line
        if self.simulator is not None:
            self.report.update("memory", {"measured_peak_bytes": self.simulator.peak_bytes})
        if self.plan_only and not self.training_reached and "transformers" in sys.modules:
            # A program that imported transformers but never trained: say so, with what the shim changed.
            self._print_plan("no training was reached: the program ended before Trainer.train")
        self.report.write()


_runtime: Runtime | None = None


def current() -> Runtime | None:
    return _runtime


def activate(**options: Any) -> bool:
    """Switch the shim on in this process (docs/user-contract.md). Idempotent; returns False when MPS_SHIM is off.

    A bad option, or a bad MPS_SHIM, raises ShimConfigError before anything is patched; its message is the one line.
    """
    global _runtime
    try:
        if kill_switch():
            return False
        resolved = load_options(**options)
    except ShimConfigError as error:
        raise error.with_traceback(None) from None  # the message says it all; the shim's parsing frames would not
    if _runtime is not None:
        if _runtime.options == resolved:
            return True
        deactivate()
    _runtime = Runtime(resolved)
    _runtime.start()
    return True


def deactivate() -> None:
    """Remove every patch and restore every original object."""
    global _runtime
    if _runtime is not None:
        runtime, _runtime = _runtime, None
        runtime.stop()


def report() -> dict[str, Any]:
    """The report as it stands now (its keys: docs/user-contract.md)."""
    if _runtime is None:
        inactive = Report(None)
        inactive.set_active(False)
        return inactive.as_dict()
    if _runtime.options.simulate is not None or "torch" in sys.modules:
        _runtime.facts  # fills the report's device section
    return _runtime.report.as_dict()


@atexit.register
def _write_report_at_exit() -> None:
    if _runtime is not None:
        _runtime.at_exit()
