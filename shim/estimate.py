"""The estimate of a training step's peak memory: pure functions of model facts, a measured calibration and the run's
shape. Nothing here touches a device or the environment.

The model (bytes):

    peak(b) = weights + optimizer state + the worst of:
              training:   gradients + activations kept for backward at micro-batch b and the longest sequence S
                          (+ the temporaries alive at the worst moment: the fp32 logits, their log-softmax and gradient)
              optimizer:  gradients + one optimizer step's temporaries
              evaluation: one evaluation batch (no gradients)

The training transient is first written analytically (`activation_bytes`), then *measured* by the preflight
(shim/preflight.py): one real forward/backward on a synthetic batch of the longest sequence at micro-batch 1 (and 2,
when 2 is expected to fit) gives transient(1) and the slope per sample, so the estimate is the device's own behaviour.
The analytic form explains (the diagnosis), extrapolates to configurations not measured, and stands in when nothing
can be measured. An estimate's `parts` add up to its `total`.
"""
from __future__ import annotations

from collections import namedtuple

from mps_shim.models import config_of, is_checkpointing

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

ModelFacts = namedtuple(
    "ModelFacts",
    "weight_bytes frozen_bytes frozen_float32_bytes trainable_bytes trainable_count largest_trainable_bytes "
    "modules_to_save_bytes modules_to_save_count hidden intermediate layers heads kv_heads vocab checkpointing",
)
ModelFacts.__doc__ = """What the estimate needs to know about a model (bytes unless said otherwise).

weight_bytes: every parameter and buffer as stored now; frozen_bytes: parameters without grad;
frozen_float32_bytes: the part of frozen_bytes that is fp32 floating point (what a smaller frozen dtype halves);
trainable_*: parameters with grad; modules_to_save_*: trainable full copies (peft `modules_to_save`);
hidden..vocab: the transformer's shape from its config; checkpointing: gradient checkpointing is on.
"""


def model_facts(model: Any) -> ModelFacts:
    """Read the facts from a model (a transformers model, possibly wrapped by peft)."""
    weight = frozen = frozen32 = trainable = count = largest = save_bytes = save_count = 0
    for name, parameter in model.named_parameters():
        size = parameter.numel() * parameter.element_size()
        weight += size
        if parameter.requires_grad:
            trainable += size
            count += parameter.numel()
            largest = max(largest, size)
            if "modules_to_save" in name:
                save_bytes += size
                save_count += parameter.numel()
        else:
            frozen += size
            if parameter.is_floating_point() and parameter.element_size() == 4:
                frozen32 += size
    for buffer in model.buffers():
        weight += buffer.numel() * buffer.element_size()
    config = config_of(model)
    hidden = getattr(config, "hidden_size", 0) or 0
    heads = getattr(config, "num_attention_heads", 1) or 1
    return ModelFacts(
        weight_bytes=weight,
        frozen_bytes=frozen,
        frozen_float32_bytes=frozen32,
        trainable_bytes=trainable,
        trainable_count=count,
        largest_trainable_bytes=largest,
        modules_to_save_bytes=save_bytes,
        modules_to_save_count=save_count,
        hidden=hidden,
        intermediate=getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden,
        layers=getattr(config, "num_hidden_layers", 0) or 0,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        vocab=getattr(config, "vocab_size", 0) or 0,
        checkpointing=is_checkpointing(model),
    )


def optimizer_state_bytes(optim: str, trainable_count: int) -> int:
    """Persistent optimizer state for the Trainer's `optim` name (states in fp32, as the trainables are)."""
    name = str(optim).lower().replace("optimizernames.", "")
    if "8bit" in name or "paged" in name:
        return 2 * trainable_count
    if "adafactor" in name:
        return trainable_count // 64  # factored second moments: rows + columns, negligible next to the weights
    if name.startswith("sgd"):
        return 4 * trainable_count  # momentum (the Trainer's SGD has none by default; counted to be safe)
    if "lion" in name:
        return 4 * trainable_count
    return 8 * trainable_count  # AdamW and friends: exp_avg and exp_avg_sq


def optimizer_step_bytes(facts: ModelFacts) -> int:
    """Temporaries of one AdamW step on MPS, which has no foreach kernels (torch's optimizers run per parameter there,
    or fused when asked): about two copies of the largest trainable tensor, never of all of them at once."""
    return 2 * facts.largest_trainable_bytes


def activation_bytes(
    facts: ModelFacts, batch: int, seq: int, compute_bytes: int, checkpointing: bool | None = None,
    attention_scores: bool = True,
) -> dict[str, int]:
    """Activations kept for backward (and the worst temporaries) at `batch` sequences of `seq` tokens, by part.

    Per token and layer of a LLaMA-style decoder: the residual stream and RMSNorm statistics in fp32 (trainable fp32
    embeddings make the residual fp32), the inputs and outputs of the projections (LoRA's dropout and A outputs
    included) in the compute dtype, q/k/v and their rotary copies, the MLP's gate, up, activation and product.
    Attention on MPS materialises the full score matrix in fp32 for q_len > 8 (docs/mps-facts.md): B x heads x S x S x 4
    per layer, kept for backward. The head: logits in the compute dtype, their fp32 upcast, the shifted copy, the
    log-softmax and, at the start of backward, their gradient (all B x S x V).
    With checkpointing, each layer keeps only its input, and one layer's activations live again during recompute.
    """
    if checkpointing is None:
        checkpointing = facts.checkpointing
    h, i, L = facts.hidden, facts.intermediate, facts.layers
    kv = h // max(facts.heads, 1) * facts.kv_heads
    a = compute_bytes
    tokens = batch * seq
    per_layer_token = a * (16 * h + 4 * kv + 6 * i) + 4 * 6 * h
    scores_per_layer = batch * facts.heads * seq * seq * 4 if attention_scores else 0
    head = tokens * facts.vocab * (a + 16)
    embeddings = tokens * h * 4
    if checkpointing:
        layers = tokens * (L * 4 * h + per_layer_token)
        scores = scores_per_layer
    else:
        layers = tokens * L * per_layer_token
        scores = L * scores_per_layer
    return {"layers": layers, "attention_scores": scores, "logits": head, "embeddings": embeddings}


def evaluation_bytes(facts: ModelFacts, batch: int, seq: int, compute_bytes: int, attention_scores: bool = True) -> int:
    """The transient of one evaluation batch (no grad): one layer's temporaries, the scores, the logits and loss."""
    tokens = batch * seq
    per_layer_token = compute_bytes * (4 * facts.hidden + 3 * facts.intermediate) + 8 * facts.hidden
    scores = batch * facts.heads * seq * seq * 4 if attention_scores else 0
    return tokens * (per_layer_token + facts.vocab * (compute_bytes + 8)) + scores


Calibration = namedtuple("Calibration", "points analytic_per_sample checkpointing")
Calibration.__doc__ = """Measured transients: points = {micro_batch: bytes above the resident weights during one
forward/backward at the longest sequence}; analytic_per_sample: activation_bytes(...) for one sample then, used to
extrapolate when only one point was measured."""


def measured_transient(calibration: Calibration, facts: ModelFacts, batch: int) -> int:
    """transient(batch) from the measurements: a line through two points, else through one point with the gradients
    as the part that does not grow with the batch."""
    points = calibration.points
    if len(points) >= 2:
        (b1, t1), (b2, t2) = sorted(points.items())[:2]
        slope = max((t2 - t1) / (b2 - b1), 0.0)
        fixed = max(t1 - slope * b1, 0.0)
        return int(fixed + slope * batch)
    (b1, t1), = points.items()
    fixed = min(facts.trainable_bytes, t1)  # the gradients appear during backward whatever the batch
    return int(fixed + (t1 - fixed) * batch / b1)


Estimate = namedtuple("Estimate", "total parts micro_batch seq calibrated phase")
Estimate.__doc__ = """An estimated peak: total bytes and its parts by name (bytes; they add up to total), for
micro_batch sequences of seq tokens; calibrated: whether the training transient was measured on the device; phase: the moment of
the peak ("training", "optimizer_step" or "evaluation")."""


def estimate_peak(
    facts: ModelFacts,
    micro_batch: int,
    seq: int,
    compute_bytes: int,
    optim: str = "adamw_torch",
    calibration: Calibration | None = None,
    accumulates: bool = True,
    eval_batch: int = 0,
    eval_seq: int = 0,
    attention_scores: bool = True,
) -> Estimate:
    """The peak of a training run's step at `micro_batch` x `seq`: the weights, the optimizer state, and the largest
    of the training transient (gradients + activations), the optimizer step's temporaries and an evaluation batch.

    accumulates: several micro-steps add into the same gradients (gradient accumulation or a split batch), so from the
    second one on the gradients are resident while the activations are built again.
    """
    optimizer = optimizer_state_bytes(optim, facts.trainable_count)
    grads = facts.trainable_bytes
    activations = activation_bytes(facts, micro_batch, seq, compute_bytes, attention_scores=attention_scores)
    calibrated = calibration is not None and calibration.checkpointing == facts.checkpointing
    if calibrated:
        transient = measured_transient(calibration, facts, micro_batch)
        # A measurement starts with no gradients; later micro-steps of a window start with all of them.
        transient += grads // 2 if accumulates else 0
        in_transient = min(grads, transient)
        training = {"gradients": in_transient, "activations_measured": transient - in_transient}
    else:
        training = {"gradients": grads, **{f"activations_{name}": value for name, value in activations.items()}}
    step_temporaries = optimizer_step_bytes(facts)
    evaluation = evaluation_bytes(facts, eval_batch, eval_seq, compute_bytes, attention_scores) if eval_batch else 0
    if calibrated and calibration.analytic_per_sample:
        # The measured/analytic ratio of training carries over to evaluation's (smaller) transient.
        ratio = training["activations_measured"] / max(1, sum(activations.values()))
        evaluation = int(evaluation * max(ratio, 0.5))
    phases = {
        "training": training,
        "optimizer_step": {"gradients": grads, "optimizer_step_temporaries": step_temporaries},
        "evaluation": {"evaluation_batch": evaluation},
    }
    phase = max(phases, key=lambda name: sum(phases[name].values()))  # ties: the first, training
    parts = {"weights": facts.weight_bytes, "optimizer_state": optimizer, **phases[phase]}
    return Estimate(sum(parts.values()), parts, micro_batch, seq, calibrated, phase)
