"""Decide, then act: pure functions from facts (device, versions, what the run asked for, options) to a plan.

Nothing here touches torch or patches anything; the patches only apply what these functions return, and the tests
check the decisions without training. The README's decision table is this module in prose.
"""
from __future__ import annotations

from collections import namedtuple

from mps_shim.device import DeviceFacts
from mps_shim.errors import PlanError
from mps_shim.units import size_text

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# torch_dtype strings a script may pass -> our short names ("auto" means "as the checkpoint is stored").
REQUESTED_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}

PrecisionPlan = namedtuple(
    "PrecisionPlan",
    "requested chosen weights_dtype trainable_dtype autocast_dtype loss_scaling owner reason",
)
PrecisionPlan.__doc__ = """What the run computes in.

requested/chosen: "bf16" | "fp16" | "fp32" (mixed precision asked for / used);
weights_dtype: dtype name of frozen weights ("bfloat16", "float16", "float32"), or None to keep what the run asks;
trainable_dtype: dtype name every trainable parameter gets;
autocast_dtype: dtype name the shim autocasts the forward to, or None;
loss_scaling: whether the shim scales the loss (fp16);
owner: "mps-shim" when the shim runs mixed precision itself, "library" when Trainer/accelerate are left to do it.
"""


def precision_support(facts: DeviceFacts, precision: str) -> str | None:
    """Why the Apple GPU described by facts cannot train in `precision` with autocast, or None if it can."""
    capabilities = facts.capabilities
    if precision == "fp32" or capabilities is None:
        return None
    where = f"(torch {facts.torch}, macOS {facts.macos})"
    if precision == "bf16":
        if not capabilities.bf16_tensors:
            return f"bf16 tensors on MPS need torch>=2.3 and macOS 14 {where}"
        if "bf16" not in capabilities.autocast_dtypes:
            return f"MPS autocast in bf16 needs torch>=2.6 and macOS 14 {where}"
        return None
    if "fp16" not in capabilities.autocast_dtypes:
        return f"MPS autocast in fp16 needs torch>=2.5 {where}"
    return None


def forced_text(forced: str, source: str) -> str:
    """How the user gave a precision: `--precision bf16` or `MPS_SHIM_PRECISION=bf16` (or `precision=bf16`)."""
    return f"{source} {forced}" if source.startswith("--") else f"{source}={forced}"


def check_forced_precision(facts: DeviceFacts, forced: str, source: str = "--precision") -> None:
    """A forced precision the device cannot run stops the run before any work, with the reason and where it was
    given (`source`: the flag, the variable or the keyword)."""
    refusal = precision_support(facts, forced) if forced != "auto" else None
    if refusal:
        raise PlanError(f"{forced_text(forced, source)} cannot run on this Mac: {refusal}")


def requested_precision(bf16: bool, fp16: bool) -> str:
    if bf16:
        return "bf16"
    return "fp16" if fp16 else "fp32"


def plan_precision(
    facts: DeviceFacts,
    requested: str,
    model_dtype: str | None = None,
    forced: str = "auto",
    forced_source: str = "--precision",
) -> PrecisionPlan:
    """The precision a run gets.

    requested: the mixed precision the run asked for ("bf16", "fp16", "fp32" = none);
    model_dtype: the weights dtype the run asked for (a torch_dtype string, or None);
    forced: the precision option ("auto" or a precision the user insists on), given as `forced_source`.

    Policy on an Apple GPU: keep bf16 where the device truly runs it (bf16 tensors and bf16 autocast); else fp16
    autocast with fp32 trainable parameters and dynamic loss scaling where MPS autocast exists; else fp32. Trainable
    parameters are always fp32, so a loss scaler never meets fp16 gradients.
    """
    asked_weights = REQUESTED_DTYPES.get(str(model_dtype).replace("torch.", ""))
    if not facts.is_mps:
        return PrecisionPlan(
            requested, requested, None, None, None, False, "library",
            f"no Apple GPU (device: {facts.type}): the run keeps the precision it asked for",
        )
    if forced != "auto":
        check_forced_precision(facts, forced, forced_source)
        chosen, reason = forced, forced_text(forced, forced_source)
    else:
        chosen, reason = _best_precision(facts, requested)

    if chosen == "fp32":
        # Without autocast every weight must share one dtype: fp32 trainable modules (LoRA, modules_to_save) cannot
        # take half-precision activations. The memory plan may still lower frozen weights, with casts around them.
        weights = "fp32"
    elif asked_weights in (None, "fp32"):
        weights = "fp32"
    else:
        weights = chosen  # half-precision frozen weights in the autocast dtype: what the run asked for, in memory
    return PrecisionPlan(
        requested=requested,
        chosen=chosen,
        weights_dtype=DTYPE_NAMES[weights],
        trainable_dtype="float32",
        autocast_dtype=DTYPE_NAMES[chosen] if chosen != "fp32" else None,
        loss_scaling=chosen == "fp16",
        owner="mps-shim",
        reason=reason,
    )


def _best_precision(facts: DeviceFacts, requested: str) -> tuple[str, str]:
    if requested == "fp32":
        return "fp32", "the run asked for no mixed precision"
    if requested == "bf16":
        refusal = precision_support(facts, "bf16")
        if refusal is None:
            return "bf16", "MPS runs bf16 autocast here"
        if precision_support(facts, "fp16") is None:
            return "fp16", f"{refusal}; using fp16 autocast with fp32 trainable weights and loss scaling"
        return "fp32", f"{refusal}, and {precision_support(facts, 'fp16')}; using fp32"
    refusal = precision_support(facts, "fp16")
    if refusal is None:
        return "fp16", "MPS runs fp16 autocast here; fp32 trainable weights and loss scaling"
    return "fp32", f"{refusal}; using fp32"


def memory_budget(facts: DeviceFacts, memory_limit: int | None) -> tuple[int | None, str]:
    """The bytes a run may use on the device, and why. A limit above the Mac's memory is capped there: past it
    nothing fails cleanly, the machine swaps."""
    if memory_limit is not None:
        total = facts.memory_total_bytes if facts.is_mps else None
        if total and memory_limit > total:
            return total, (
                f"--memory-limit {size_text(memory_limit)} is more than this Mac's {size_text(total)} of memory; "
                "capped at the Mac's memory, past which macOS swaps"
            )
        return memory_limit, "--memory-limit"
    if facts.is_mps and facts.recommended_max_bytes:
        return facts.recommended_max_bytes, "Metal's recommended working set; past it macOS swaps instead of failing"
    return None, f"no Apple GPU ({facts.type}): no budget is enforced"


def safer_precision(facts: DeviceFacts, current: str) -> str | None:
    """Where a run whose forward keeps producing non-finite losses goes next: fp16 -> bf16 (if the device has it) ->
    fp32; None when it already is in fp32."""
    if current == "fp16" and precision_support(facts, "bf16") is None:
        return "bf16"
    return "fp32" if current != "fp32" else None
