"""torchrun on one Mac: the training script runs in the launcher's own process, on the Apple GPU.

Corrects: torchrun sets LOCAL_RANK/RANK/WORLD_SIZE, and with those accelerate up to 1.12 picks MULTI_CPU with gloo
(`PartialState._prepare_backend`), so upstream's `torchrun --nnodes 1 --nproc_per_node 1` trains on the CPU without a
word. A Mac has one GPU: with a single node, the script runs once, in this process, with no distributed environment;
`--nproc_per_node N` becomes gradient accumulation x N (patches/training_args.py), so the effective batch is kept.
Multi-node runs and `--no-python` are left to torchrun. Versions: torch 2.0+ (`torch.distributed.run.run`).
"""
from __future__ import annotations

import os
import sys

from mps_shim.patches.training_args import COLLAPSED_WORLD
from mps_shim.registry import Patch


def requested_processes(nproc_per_node) -> int:
    """torchrun's --nproc_per_node: a number, or "auto"/"gpu"/"cpu" which on one Mac mean one GPU's worth."""
    text = str(nproc_per_node)
    return int(text) if text.isdigit() else 1


def single_node(nnodes) -> bool:
    return str(nnodes).split(":")[-1] == "1"


class TorchrunPatch(Patch):
    target = "torch.distributed.run"
    distribution = "torch"
    supported = ">=2.0"
    corrects = "torchrun on a Mac trains on the CPU under gloo (accelerate <= 1.12)"
    mac_only = True

    def apply(self, module) -> None:
        self.get_use_env = self.attribute(module, "get_use_env")
        self.wrap(module, "run", self._run)

    def _run(self, wrapped, instance, args, kwargs):
        import runpy

        from mps_shim.launcher import run_script

        parsed = kwargs.get("args", args[0] if args else None)
        if not single_node(parsed.nnodes) or parsed.no_python:
            return wrapped(*args, **kwargs)
        processes = requested_processes(parsed.nproc_per_node)
        script_args = list(parsed.training_script_args)
        if not self.get_use_env(parsed):
            script_args.insert(0, "--local-rank=0")
        self.runtime.report.change(
            "torchrun", f"--nproc_per_node {parsed.nproc_per_node}", "1 process on the Apple GPU",
            "torchrun's environment makes accelerate <= 1.12 train on the CPU; a Mac has one GPU",
        )
        if processes > 1:
            os.environ[COLLAPSED_WORLD] = str(processes)
        for variable in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(variable, None)
        if parsed.module:
            sys.argv = [parsed.training_script, *script_args]
            runpy.run_module(parsed.training_script, run_name="__main__", alter_sys=True)
        else:
            run_script(parsed.training_script, script_args)


PATCH = TorchrunPatch
