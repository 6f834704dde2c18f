"""TrainingArguments: the run's precision, batch split and CUDA-only options follow the plan, before validation.

Corrects, on an Apple GPU (real or simulated):
- transformers 4.40-4.41 reject `--bf16`/`--fp16` on MPS inside `__post_init__` ("BF16 Mixed precision training with
  AMP ... can only be used on CUDA, XPU ..."), 4.52-4.55 reject bf16 ("Your setup doesn't support bf16/gpu."), 4.56+
  and 5.x reject it below macOS 14; accelerate 0.30-1.10 refuse fp16 on MPS and, with bf16 under transformers 4.x,
  silently drop autocast. The flags are therefore taken out before validation runs (so argument parsing succeeds on
  every version) and the shim runs the plan's mixed precision itself; transformers tells accelerate "no" mixed
  precision (`ACCELERATE_MIXED_PRECISION` in 4.x, `mixed_precision` in 5.x), consistent with that.
- `--deepspeed` and `--tf32` only work on CUDA: dropped.
- `adamw_torch` (4.x's default, and 5.x's below torch 2.8) -> `adamw_torch_fused` where torch runs fused Adam/AdamW
  on mps (2.5+: "mps" in torch.utils._foreach_utils._get_fused_kernels_supported_devices): one kernel per parameter
  instead of a dozen ops, as transformers 5.x itself defaults to from torch 2.8. Safe with the shim's loss scaler,
  which never hands the optimizer grad_scale/found_inf (shim/scaling.py). Below 2.5, `adamw_torch_fused` ->
  `adamw_torch` (fused=True refuses mps parameters there). Any other optimizer the user picked is kept.
- `dataloader_pin_memory` (default True) -> False: MPS has no pinned memory. torch's DataLoader never pins for it
  (2.2-2.6: pinning needs CUDA; 2.7-2.15: "'pin_memory' argument is set as true but not supported on MPS now"), so
  the flag only adds that warning to every DataLoader iterator (each epoch, each evaluation).
- `--torch_compile` with Inductor (the default backend) below torch 2.7 -> off: Inductor has no MPS code generator
  before 2.7 (torch/_inductor/codegen/mps.py first ships in the 2.7 wheels; 2.2-2.6 raise "Unsupported device type:
  mps" in the scheduler), so the first compiled forward fails. From 2.7 on it is left as asked.
- a `torchrun --nproc_per_node N` collapsed into one process (patches/torchrun.py) multiplies
  `gradient_accumulation_steps` by N, so the effective batch is the one asked for.
Versions: transformers 4.40-5.x.
"""
from __future__ import annotations

import os

from mps_shim.registry import Patch

# The first torch release whose Inductor generates code for MPS (docs/mps-facts.md, "Long runs").
INDUCTOR_MPS_FROM = (2, 7)

# Set by patches/torchrun.py when it runs N requested processes as one.
COLLAPSED_WORLD = "MPS_SHIM_COLLAPSED_WORLD_SIZE"


class TrainingArgumentsPatch(Patch):
    target = "transformers.training_args"
    distribution = "transformers"
    supported = ">=4.40,<6"
    corrects = "bf16/fp16 rejected or silently dropped on MPS; CUDA-only options; torchrun's processes"

    def apply(self, module) -> None:
        self.wrap(module.TrainingArguments, "__post_init__", self._post_init)

    def _post_init(self, wrapped, args, positional, kwargs):
        runtime = self.runtime
        if runtime.changes_numbers and not getattr(args, "use_cpu", False) and not getattr(args, "no_cuda", False):
            self._follow_plan(args)
        result = wrapped(*positional, **kwargs)
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        runtime.report.update(
            "batch",
            {
                "per_device_train_batch_size": args.per_device_train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "world_size": world,
                "requested_world_size": int(os.environ.get(COLLAPSED_WORLD, world)),
                "micro_batch": args.per_device_train_batch_size,
                "effective_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
            },
        )
        return result

    def _follow_plan(self, args) -> None:
        from mps_shim.plan import requested_precision

        runtime = self.runtime
        change = runtime.report.change
        requested = requested_precision(bool(args.bf16), bool(args.fp16))
        plan = runtime.precision.decide(amp=requested)
        why = f"{plan.reason}; mps-shim runs {plan.chosen} itself" if plan.autocast_dtype else plan.reason
        for flag in ("bf16", "fp16", "bf16_full_eval", "fp16_full_eval"):
            if getattr(args, flag, False):
                setattr(args, flag, False)
                change(f"TrainingArguments.{flag}", True, False, why)
        if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
            change("environment ACCELERATE_MIXED_PRECISION", os.environ["ACCELERATE_MIXED_PRECISION"], "no", why)
            os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
        if getattr(args, "deepspeed", None):
            change("TrainingArguments.deepspeed", args.deepspeed, None, "DeepSpeed needs CUDA")
            args.deepspeed = None
        if getattr(args, "tf32", None) is not None:
            change("TrainingArguments.tf32", args.tf32, None, "TF32 is a CUDA (Ampere) mode")
            args.tf32 = None
        self._optimizer(args)
        self._torch_compile(args)
        if getattr(args, "dataloader_pin_memory", False):
            args.dataloader_pin_memory = False
            change("TrainingArguments.dataloader_pin_memory", True, False,
                   "MPS has no pinned memory: torch's DataLoader never pins for it and warns on every iterator")
        world = int(os.environ.get(COLLAPSED_WORLD, "1"))
        if world > 1:
            accumulation = args.gradient_accumulation_steps * world
            change(
                "TrainingArguments.gradient_accumulation_steps", args.gradient_accumulation_steps, accumulation,
                f"torchrun's {world} processes run as one on the single Apple GPU; the effective batch is kept",
            )
            args.gradient_accumulation_steps = accumulation

    def _optimizer(self, args) -> None:
        capabilities = self.runtime.facts.capabilities
        optim = str(getattr(args.optim, "value", args.optim))
        if optim == "adamw_torch" and capabilities.fused_adamw:
            args.optim = "adamw_torch_fused"
            self.runtime.report.change(
                "TrainingArguments.optim", optim, "adamw_torch_fused",
                f"torch {capabilities.torch} runs fused AdamW on the Apple GPU: one kernel per parameter, the same "
                "update; the shim's loss scaler never passes it grad_scale/found_inf",
            )
        elif optim == "adamw_torch_fused" and not capabilities.fused_adamw:
            args.optim = "adamw_torch"
            self.runtime.report.change(
                "TrainingArguments.optim", optim, "adamw_torch",
                f"fused AdamW runs on the Apple GPU from torch 2.5; torch {capabilities.torch} refuses mps parameters",
            )

    def _torch_compile(self, args) -> None:
        mode, backend = getattr(args, "torch_compile_mode", None), getattr(args, "torch_compile_backend", None)
        compiles = getattr(args, "torch_compile", False) or mode is not None or backend is not None
        release = tuple(int(part) for part in self.runtime.facts.torch.split(".")[:2])
        if not compiles or (backend or "inductor") != "inductor" or release >= INDUCTOR_MPS_FROM:
            return
        args.torch_compile, args.torch_compile_mode, args.torch_compile_backend = False, None, None
        self.runtime.report.change(
            "TrainingArguments.torch_compile", True, False,
            f"torch {self.runtime.facts.torch}'s Inductor has no MPS backend (from torch 2.7): the first compiled "
            "forward would fail; the run trains uncompiled",
        )


PATCH = TrainingArgumentsPatch
