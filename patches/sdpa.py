"""scaled_dot_product_attention on MPS in torch 2.8-2.11: q, k and v made contiguous.

Corrects: MPS SDPA gives wrong values for permuted (non-contiguous) q/k/v with batch > 1 in its `sdpa_vector` Metal
kernels (queries of up to 8 tokens: evaluation and generation, not training steps), which first ship in torch 2.8 and
are fixed in 2.12 (docs/mps-facts.md); transformers' LLaMA passes exactly such transposed tensors (4.40 makes them
contiguous only on CUDA). Silent wrong results, so it applies only where the installed (or emulated) torch has the
defect. Versions: torch 2.8-2.11 on MPS.
"""
from __future__ import annotations

from mps_shim.registry import Patch


class ContiguousSdpaPatch(Patch):
    target = "torch"  # not torch.nn.functional: that loads while torch itself is still half-imported
    distribution = "torch"
    supported = ">=2.0"
    corrects = "wrong SDPA results on MPS for non-contiguous q/k/v before torch 2.12"

    def applies(self, module) -> bool:
        facts = self.runtime.facts
        return facts.is_mps and not facts.capabilities.sdpa_noncontiguous_correct

    def apply(self, module) -> None:
        self.wrap(module.nn.functional, "scaled_dot_product_attention", self._sdpa)
        self.runtime.report.change(
            "torch.nn.functional.scaled_dot_product_attention", "q/k/v as given", "q/k/v contiguous",
            "MPS SDPA (sdpa_vector) is wrong for non-contiguous inputs in torch 2.8-2.11 "
            f"(torch {self.runtime.facts.torch})",
        )

    def _sdpa(self, wrapped, instance, args, kwargs):
        args = tuple(a.contiguous() if i < 3 and hasattr(a, "contiguous") else a for i, a in enumerate(args))
        for name in ("query", "key", "value"):
            if name in kwargs:
                kwargs[name] = kwargs[name].contiguous()
        return wrapped(*args, **kwargs)


PATCH = ContiguousSdpaPatch
