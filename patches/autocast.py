"""torch.autocast: a CUDA autocast in a script becomes the Apple GPU's, in a dtype it runs, or a disabled one.

Corrects: `torch.autocast("cuda", ...)` / `torch.cuda.amp.autocast(...)` in a script written for NVIDIA do nothing on
a Mac but warn ("User provided device_type of 'cuda', but CUDA is not available. Disabling"), and a bf16 request on an
Apple GPU without bf16 autocast is refused (torch < 2.5 errors, 2.5 and macOS 13 disable it). Both become the plan's
autocast on MPS. Where the plan has no autocast, or the call asks for none, it becomes a disabled CPU autocast: torch
< 2.5 raises for any "mps" autocast, even a disabled one, and 2.5-2.9 warn for one in a dtype they lack
(docs/mps-facts.md). Versions: torch 2.0+.
"""
from __future__ import annotations

from mps_shim.registry import Patch


class AutocastPatch(Patch):
    target = "torch"  # not torch.amp.autocast_mode: that loads while torch itself is still half-imported
    distribution = "torch"
    supported = ">=2.0"
    corrects = "CUDA autocast in NVIDIA-first scripts; bf16 autocast where MPS lacks it"
    mac_only = True

    def apply(self, module) -> None:
        self.wrap(module.amp.autocast_mode.autocast, "__init__", self._init)

    def _init(self, wrapped, autocast, args, kwargs):
        import torch

        from mps_shim.plan import REQUESTED_DTYPES, plan_precision

        device_type = kwargs.get("device_type", args[0] if args else None)
        if device_type not in ("cuda", "mps"):
            return wrapped(*args, **kwargs)
        runtime = self.runtime
        dtype = kwargs.get("dtype", args[1] if len(args) > 1 else None)
        asked = "float16" if dtype is None else str(dtype).replace("torch.", "")  # CUDA's and MPS's default
        # This call asks for mixed precision in `asked` whatever the Trainer's plan is: decide for it alone.
        plan = plan_precision(runtime.facts, REQUESTED_DTYPES.get(asked, "fp32"), forced=runtime.options.precision)
        wanted = plan.autocast_dtype
        if wanted != asked:
            runtime.report.change("torch.autocast(dtype=)", asked, wanted, plan.reason)
        enabled = kwargs.get("enabled", args[2] if len(args) > 2 else True) and wanted is not None
        rest = {"cache_enabled": kwargs.get("cache_enabled", args[3] if len(args) > 3 else None)}
        if not enabled:
            if device_type == "cuda":
                runtime.report.change("torch.autocast(device_type=)", "cuda", "disabled", "no CUDA on a Mac")
            return wrapped("cpu", enabled=False, **rest)  # does nothing, on every torch, without a word
        if device_type == "cuda":
            runtime.report.change("torch.autocast(device_type=)", "cuda", "mps", "no CUDA on a Mac; the Apple GPU")
        return wrapped("mps", dtype=getattr(torch, wanted), enabled=True, **rest)


PATCH = AutocastPatch
