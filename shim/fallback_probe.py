"""`mps-shim doctor --model PATH`: one training step of the model's architecture, to list the ops that would run on the
CPU before a real run does.

The model is built from its configuration (PATH is a folder with config.json, or a Hub name in the local cache; no
weights are read), with one layer and a vocabulary of at most 1,024 tokens, randomly initialised: the same ops as the
full model, at a size any Mac holds. With LoRA adapters where peft has default target modules for the architecture,
under the autocast the shim would choose for the upstream recipe (`--bf16`), it runs one forward pass, one backward
pass and one AdamW step on the Apple GPU (real or simulated) with the shim active, and returns what
shim/fallbacks.py counted.
"""
from __future__ import annotations

import contextlib
import os

from mps_shim.config import ENV, Options
from mps_shim.errors import ShimError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

LAYERS = 1
VOCABULARY = 1024
BATCH, SEQUENCE = 2, 16


class ProbeError(ShimError):
    exit_status = 2


def probe_fallbacks(options: Options, model: str) -> dict[str, Any]:
    """{"model", "steps", "lora", "ops": {op: calls}, "observed", "note"}; raises ProbeError when the model cannot be
    built. Activates the shim in this process for the step and switches it off after."""
    import importlib.util

    import mps_shim
    from mps_shim import runtime as runtime_module

    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise ProbeError(f"--model needs {' and '.join(missing)} installed: the step runs the model")

    settings = {name: getattr(options, name) for name in ENV}
    settings.update(report=None, log_level="quiet")
    mps_shim.activate(**settings)  # before torch loads: PYTORCH_ENABLE_MPS_FALLBACK is read then
    import logging

    shim_log = logging.getLogger("mps_shim")
    was_disabled, shim_log.disabled = shim_log.disabled, True  # doctor prints the findings; the run's lines would
    try:  # repeat them
        runtime = runtime_module.current()
        import torch

        facts = runtime.facts
        if not facts.is_mps or runtime.fallbacks is None:
            return {"model": model, "ops": None, "note": "no Apple GPU with the CPU fallback here: nothing to probe"}
        network, lora = _build(model, facts.compute_device, runtime)
        runtime.fallbacks.show = False  # listed in the findings instead
        _one_step(torch, network, runtime, facts)
        watch = runtime.fallbacks
        return {
            "model": model,
            "steps": "one forward, backward and AdamW step",
            "lora": lora,
            "ops": watch.section()["ops"],
            "observed": watch.section()["observed"],
            "note": f"{LAYERS} layer, vocabulary of at most {VOCABULARY} tokens, random weights: the model's ops, "
                    "not its sizes",
        }
    finally:
        mps_shim.deactivate()
        shim_log.disabled = was_disabled


def _build(model: str, device: str, runtime: Any) -> tuple[Any, bool]:
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isdir(model) and (os.sep in model or os.path.exists(model)):
        raise ProbeError(f"--model {model!r}: no such folder (a folder with the model's config.json, or a Hub name)")
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ProbeError(f"--model {model!r}: no model configuration there ({error})") from None
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, min(getattr(config, name), LAYERS))
    if isinstance(getattr(config, "vocab_size", None), int):
        config.vocab_size = min(config.vocab_size, VOCABULARY)
    try:
        network = AutoModelForCausalLM.from_config(config)
    except ValueError as error:
        raise ProbeError(f"--model {model!r}: not a causal language model transformers can build ({error})") from None
    import torch
    from mps_shim.plan import plan_precision

    weights = plan_precision(runtime.facts, "bf16", "bfloat16").weights_dtype or "float32"
    network.to(device=device, dtype=getattr(torch, weights))  # the frozen weights as the shim would load them
    runtime.place(network)
    lora = False
    with contextlib.suppress(ImportError, ValueError):
        from peft import LoraConfig, get_peft_model

        network = get_peft_model(network, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM"))
        for parameter in network.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()  # trainable weights in fp32, as the shim makes them
        network.to(device)
        runtime.place(network)
        lora = True
    return network, lora


def _one_step(torch: Any, network: Any, runtime: Any, facts: Any) -> None:
    from mps_shim.plan import plan_precision

    device = facts.compute_device
    vocab = network.config.vocab_size if hasattr(network, "config") else VOCABULARY
    ids = torch.randint(0, vocab, (BATCH, SEQUENCE), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    network.train()
    autocast = plan_precision(facts, "bf16", "bfloat16").autocast_dtype
    context = torch.autocast("mps", dtype=getattr(torch, autocast)) if autocast else contextlib.nullcontext()
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    with context:
        loss = network(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
