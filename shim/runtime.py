"""Activation: one Runtime per process holds the options, the report, the device facts and the patch registry."""
from __future__ import annotations

import atexit
import logging
import os
import sys

from mps_shim.config import Options, kill_switch, load_options
from mps_shim.hooks import when_imported
from mps_shim.registry import Registry
from mps_shim.report import Report, configure_logging

TYPE_CHECKING = False  # typing itself is not imported: `import mps_shim` runs at the start of every process
if TYPE_CHECKING:
    from typing import Any

    from mps_shim.device import DeviceFacts
    from mps_shim.plan import PrecisionPlan

# Read by torch once, when it loads (matrix C(g)): setting it later, as accelerate does, has no effect.
FALLBACK_VARIABLE = "PYTORCH_ENABLE_MPS_FALLBACK"


class Runtime:
    def __init__(self, options: Options):
        self.options = options
        self.report = Report(options.report)
        self.registry = Registry(self)
        self._facts: DeviceFacts | None = None
        self.simulator = None
        self.saved_environ: dict[str, str | None] = {}
        # The run as far as the patches have seen it; plan.py decides from it.
        self.requested = {"amp": None, "model_dtype": None}
        self.precision: PrecisionPlan | None = None
        self.loss_scaler = None

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

    def decide_precision(self, **request) -> PrecisionPlan:
        """(Re)decide the precision from what the run has asked for so far; the report follows."""
        from mps_shim.plan import plan_precision

        self.requested.update({k: v for k, v in request.items() if v is not None})
        self.precision = plan_precision(
            self.facts,
            self.requested["amp"] or "fp32",
            self.requested["model_dtype"],
            forced=self.options.precision,
        )
        self._record_precision()
        return self.precision

    def _record_precision(self) -> None:
        self.report.update("precision", {name: getattr(self.precision, name) for name in self.precision._fields})

    def autocast(self):
        """The autocast context the shim runs the forward under, on the real or the simulated Apple GPU."""
        import torch

        dtype = getattr(torch, self.precision.autocast_dtype)
        if self.simulator is not None:
            return self.simulator.autocast(dtype)
        return torch.autocast(self.facts.compute_device, dtype=dtype)

    def place(self, model) -> None:
        """The model is on the device now: the simulated one starts counting its memory and refusing what MPS would."""
        if self.simulator is not None:
            self.simulator.adopt(model)

    def fall_back_precision(self, model, step: int | None) -> None:
        """Move a running model to a safer precision in place: parameters keep their identity, so the optimizer's
        state, the schedule and the step count carry on."""
        import torch

        from mps_shim.plan import plan_precision, safer_precision

        before = self.precision
        safer = safer_precision(self.facts, before.chosen)
        if safer is None:
            self.report.event("precision_fallback", "non-finite losses in fp32: nothing safer to fall back to", step)
            return
        self.precision = plan_precision(self.facts, safer, self.requested["model_dtype"])
        self._record_precision()
        if self.precision.weights_dtype == "float32":
            model.to(torch.float32)
        if self.loss_scaler is not None and not self.precision.loss_scaling:
            self.loss_scaler.dynamic = False
            self.loss_scaler.scale_value = 1.0
        self.report.event(
            "precision_fallback", f"{before.chosen} -> {safer} after repeated non-finite losses in the forward pass",
            step,
        )

    def start(self) -> None:
        configure_logging(self.options.log_level)
        if self.on_mac:
            self._set_before_torch(FALLBACK_VARIABLE, "1", "ops MPS lacks run on the CPU instead of stopping the run")
            from mps_shim.memory import set_watermarks

            set_watermarks(self)  # the memory budget, before torch's allocator reads it (issue 5)
        when_imported("torch", self._on_torch_import)  # first: the patches on torch may need the simulator
        self.registry.install()

    def _set_before_torch(self, variable: str, value: str, reason: str) -> None:
        """Set an environment variable that torch reads only while it loads; say so if that moment has passed."""
        if os.environ.get(variable) is not None:
            return  # the user's own setting wins
        if "torch" in sys.modules:
            self.report.note(f"{variable} not set: torch was imported before mps_shim ({reason})", logging.WARNING)
            return
        self.saved_environ[variable] = None
        os.environ[variable] = value
        self.report.change(f"environment {variable}", None, value, reason)

    def _on_torch_import(self, torch) -> None:
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
            from mps_shim.memory import enforce_budget

            enforce_budget(self, torch)

    def stop(self) -> None:
        self.registry.uninstall()
        if self.simulator is not None:
            self.simulator.uninstall()
            self.simulator = None
        for variable, value in self.saved_environ.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
        self.report.data["active"] = False
        self.report.write()

    def at_exit(self) -> None:
        if self.simulator is not None:
            self.report.update("memory", {"measured_peak_bytes": self.simulator.peak_bytes})
        self.report.write()


_runtime: Runtime | None = None


def current() -> Runtime | None:
    return _runtime


def activate(**options: Any) -> bool:
    """Switch the shim on in this process (interface.md 2b). Idempotent; returns False under MPS_SHIM=0."""
    global _runtime
    if kill_switch():
        return False
    resolved = load_options(**options)
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
    """The report as it stands now (interface.md section 5)."""
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
