"""The run's precision: the plan as decided so far (shim/plan.py decides), and the only code that changes it.

Three things change a run's precision after the first decision: what the run asks for as the patches see it
(TrainingArguments' bf16/fp16, from_pretrained's dtype), a fall-back after repeated non-finite losses, and the memory
ladder lowering frozen weights to the autocast dtype. All three go through this object, which keeps the report's
`precision` section in step.
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from mps_shim.plan import PrecisionPlan


class PrecisionState:
    def __init__(self, runtime: Any):
        self._runtime = runtime
        self.plan: PrecisionPlan | None = None
        self.requested: dict[str, str | None] = {"amp": None, "model_dtype": None}
        self.loss_scaler = None  # the shim's DynamicLossScaler once a Trainer has an accelerator

    def decide(self, **request: str | None) -> PrecisionPlan:
        """(Re)decide from what the run has asked for so far (amp=, model_dtype=)."""
        from mps_shim.config import source_of
        from mps_shim.plan import plan_precision

        self.requested.update({k: v for k, v in request.items() if v is not None})
        runtime = self._runtime
        options = runtime.options
        self._set(plan_precision(
            runtime.facts, self.requested["amp"] or "fp32", self.requested["model_dtype"],
            forced=options.precision, forced_source=source_of(options, "precision"),
        ))
        return self.plan

    def current(self) -> PrecisionPlan:
        """The plan, decided from what is known if nothing has asked yet."""
        return self.plan if self.plan is not None else self.decide()

    def _set(self, plan: PrecisionPlan) -> None:
        self.plan = plan
        self._runtime.report.update("precision", {name: getattr(plan, name) for name in plan._fields})

    def autocast(self) -> Any:
        """The autocast context the shim runs the forward under, on the real or the simulated Apple GPU."""
        import torch

        return torch.autocast("mps", dtype=getattr(torch, self.plan.autocast_dtype))  # emulated when simulating

    def fall_back(self, model: Any, step: int | None) -> None:
        """Move a running model to a safer precision in place: parameters keep their identity, so the optimizer's
        state, the schedule and the step count carry on."""
        import torch

        from mps_shim.plan import plan_precision, safer_precision

        runtime = self._runtime
        before = self.plan
        safer = safer_precision(runtime.facts, before.chosen)
        if safer is None:
            runtime.report.event("precision_fallback", "non-finite losses in fp32: nothing safer to fall back to", step)
            return
        self._set(plan_precision(runtime.facts, safer, self.requested["model_dtype"]))
        if self.plan.weights_dtype == "float32":
            model.to(torch.float32)
        if self.loss_scaler is not None and not self.plan.loss_scaling:
            self.loss_scaler.dynamic = False
            self.loss_scaler.scale_value = 1.0
        runtime.report.event(
            "precision_fallback", f"{before.chosen} -> {safer} after repeated non-finite losses in the forward pass",
            step,
        )

    def lower_frozen_weights(self, model: Any, why: str) -> None:
        """Frozen fp32 weights to the autocast dtype, which the forward computes in anyway; trainable weights stay
        fp32."""
        from mps_shim.models import lower_frozen_weights

        dtype_name = self.plan.autocast_dtype
        count = lower_frozen_weights(model, dtype_name)
        self._set(self.plan._replace(weights_dtype=dtype_name))
        self._runtime.report.change(
            "frozen weights dtype", "float32", dtype_name,
            f"{why}; the forward computes in {dtype_name} under autocast anyway ({count} frozen tensors; trainable "
            "weights stay float32)",
        )
