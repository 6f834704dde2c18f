"""Memory as a solved problem (issue 5): the budget, the preflight estimate, the split of each batch, the ladder of
what to give up when even one sample does not fit, and what counts as out of memory.

Decide, then act: everything here is a pure function of numbers (model facts, a measured calibration, the budget),
except three small adapters kept at the end of the module: `set_watermarks`/`enforce_budget` (the budget reaching the
allocator), `DeviceMemory` (the real or simulated device's figures) and `PressureWatch` (swap and memory pressure).
patches/trainer_memory.py applies what these functions return. Nothing here imports torch at module level: the
watermark part runs at the start of every shimmed process, before torch loads.

The model of a training step's memory (bytes):

    peak(b) = weights + optimizer state + transient(b)
    transient(b) = gradients + activations kept for backward at micro-batch b and the longest sequence S
                   (+ the temporaries alive at the worst moment: the fp32 logits, their log-softmax and gradient)

`transient` is first written analytically (`activation_bytes`), then *measured*: one real forward/backward on a
synthetic batch of the longest sequence at micro-batch 1 (and 2, when 2 is expected to fit) gives transient(1) and the
slope per sample, so the estimate is the device's own behaviour (on a real Mac that includes MPS attention's S x S
score matrix; the analytic form includes it too). The analytic form is still used to explain (the diagnosis), to
extrapolate to a configuration not yet measured, and when no measurement is possible.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from collections import namedtuple

from mps_shim.report import gib

TYPE_CHECKING = False  # typing itself is not imported: this module may load at the start of every shimmed process
if TYPE_CHECKING:
    from typing import Any, Callable

MIB = 2**20

# --------------------------------------------------------------------------------------------------------------------
# What counts as out of memory (matrix B3, C(f))
# --------------------------------------------------------------------------------------------------------------------

OUT_OF_MEMORY_TEXTS = (
    "MPS backend out of memory",  # any size units: GB/MB (older torch) or GiB/MiB (newer), with or without the limit
    "Invalid buffer size",  # one Metal buffer above maxBufferLength
    "CUDA out of memory",
    "XPU out of memory",
    "HIP out of memory",
    "DefaultCPUAllocator: can't allocate memory",
)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception is a device (or CPU allocator) out-of-memory, whatever accelerate's version thinks."""
    if isinstance(error, MemoryError):
        return True
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(error).__mro__):  # torch.OutOfMemoryError, any alias
        return True
    if not isinstance(error, RuntimeError):
        return False
    text = str(error)
    return any(marker in text for marker in OUT_OF_MEMORY_TEXTS)


# --------------------------------------------------------------------------------------------------------------------
# The budget and the watermark variables (matrix C(d), C(e))
# --------------------------------------------------------------------------------------------------------------------

HIGH_WATERMARK = "PYTORCH_MPS_HIGH_WATERMARK_RATIO"
LOW_WATERMARK = "PYTORCH_MPS_LOW_WATERMARK_RATIO"
TORCH_DEFAULT_HIGH = 1.7
TORCH_DEFAULT_LOW = 1.4  # on unified memory; a HIGH below it without a LOW fails the allocator at start-up
HIGH_UPPER_BOUND = 2.0
# The soft limit (garbage collection of cached buffers, adaptive commit) keeps torch's own proportion to the hard
# limit (1.4 / 1.7): the allocator behaves as by default, only scaled to the budget, and LOW <= HIGH always holds.
LOW_TO_HIGH = TORCH_DEFAULT_LOW / TORCH_DEFAULT_HIGH


def _ratio_text(value: float) -> str:
    return format(value, ".10g")


def watermark_ratios(budget_bytes: int, recommended_bytes: int) -> tuple[float, float, str | None]:
    """(high, low, why the budget could not be honoured exactly or None) for a budget in bytes.

    high = budget / recommendedMaxWorkingSetSize (1.0 when the budget is the recommended working set), capped at
    torch's upper bound of 2.0; low = high x 1.4/1.7.
    """
    high = budget_bytes / recommended_bytes
    note = None
    if high > HIGH_UPPER_BOUND:
        note = (
            f"the memory limit is {high:.2f}x the recommended working set; torch allows at most "
            f"{HIGH_UPPER_BOUND}x, so the budget is {HIGH_UPPER_BOUND}x"
        )
        high = HIGH_UPPER_BOUND
    return high, high * LOW_TO_HIGH, note


def watermark_settings(
    environ, budget_bytes: int, recommended_bytes: int
) -> tuple[list[tuple[str, str, str]], list[str]]:
    """The watermark variables to set, as (variable, value, reason), and notes; the user's own settings win,
    except that a lone HIGH below torch's default LOW gets a LOW that keeps the allocator alive."""
    high, low, note = watermark_ratios(budget_bytes, recommended_bytes)
    notes = [note] if note else []
    user_high, user_low = environ.get(HIGH_WATERMARK), environ.get(LOW_WATERMARK)
    reason = (
        f"memory budget {gib(budget_bytes)}: past it the run gets a clean out-of-memory error (which "
        "mps-shim recovers from) instead of swapping the machine"
    )
    if user_high is None and user_low is None:
        return [(HIGH_WATERMARK, _ratio_text(high), reason), (LOW_WATERMARK, _ratio_text(low), reason)], notes
    if user_high is not None and user_low is None:
        try:
            their_high = float(user_high)
        except ValueError:
            return [], notes
        if 0.0 < their_high < TORCH_DEFAULT_LOW:
            return [(
                LOW_WATERMARK, _ratio_text(their_high * LOW_TO_HIGH),
                f"{HIGH_WATERMARK}={user_high} is below the default low watermark {TORCH_DEFAULT_LOW}, which makes "
                "the MPS allocator fail at start-up",
            )], notes
        return [], notes
    if user_high is not None and user_low is not None:
        try:
            if float(user_low) > float(user_high) > 0:
                notes.append(
                    f"{LOW_WATERMARK}={user_low} is above {HIGH_WATERMARK}={user_high}: the MPS allocator will refuse "
                    "to start (invalid low watermark ratio)"
                )
        except ValueError:
            pass
    return [], notes


def recommended_without_torch(facts_or_none, total_bytes: int | None = None) -> int | None:
    """Metal's recommended working set before torch is loaded: the simulated one, else from the machine's memory."""
    if facts_or_none is not None and getattr(facts_or_none, "recommended_max_bytes", None):
        return facts_or_none.recommended_max_bytes
    if total_bytes is None:
        try:
            total_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    from mps_shim.capabilities import recommended_working_set

    return recommended_working_set(total_bytes)


def set_watermarks(runtime) -> None:
    """Runtime.start() on an Apple GPU: the watermark variables, before torch's allocator reads them.

    When torch is already imported (a notebook, `mps_shim.activate()` late) that moment has passed: one line says so,
    and `enforce_budget` applies the limit through set_per_process_memory_fraction once torch is there."""
    options = runtime.options
    facts = runtime.facts if options.simulate is not None else None  # simulated facts need no torch
    recommended = recommended_without_torch(facts)
    if recommended is None:
        return
    budget = options.memory_limit or recommended
    settings, notes = watermark_settings(os.environ, budget, recommended)
    for note in notes:
        runtime.report.note(note, logging.WARNING)
    if not settings:
        return
    if "torch" in sys.modules:
        names = " and ".join(variable for variable, _, _ in settings)
        runtime.report.note(
            f"{names} not set: torch was imported before mps_shim; the budget is applied with "
            "torch.mps.set_per_process_memory_fraction instead (torch's default low watermark stays)",
            logging.WARNING,
        )
        return
    for variable, value, reason in settings:
        runtime.saved_environ.setdefault(variable, os.environ.get(variable))
        os.environ[variable] = value
        runtime.report.change(f"environment {variable}", None, value, reason)


def enforce_budget(runtime, torch) -> int | None:
    """Once torch is loaded: make the device's hard limit the budget (if the variables came too late, or the
    recommended working set differs from the estimate made without torch) and put it in the report."""
    from mps_shim.device import MpsMemory
    from mps_shim.plan import memory_budget

    facts = runtime.facts
    if not facts.is_mps or not facts.recommended_max_bytes:
        runtime.report.update("memory", {"budget_bytes": None})
        return None
    simulator = runtime.simulator
    recommended = facts.recommended_max_bytes
    users_high = os.environ.get(HIGH_WATERMARK) if HIGH_WATERMARK not in runtime.saved_environ else None
    if runtime.options.memory_limit is None and users_high is not None:
        # The user's own watermark is the budget (0.0: no limit but the machine's memory).
        if simulator is not None:
            budget = simulator.budget_bytes
        else:
            try:
                budget = int(float(users_high) * recommended) or facts.memory_total_bytes
            except ValueError:
                budget = recommended
        runtime.report.update("memory", {"budget_bytes": budget})
        return budget
    budget, reason = memory_budget(facts, runtime.options.memory_limit)
    high, _low, _note = watermark_ratios(budget, recommended)
    budget = int(high * recommended)
    if simulator is not None:
        current = simulator.budget_bytes
        if current is None or abs(current - budget) > max(1, budget // 1000):
            simulator.set_memory_fraction(float(high))
        budget = simulator.budget_bytes
    elif users_high is None and HIGH_WATERMARK not in runtime.saved_environ or runtime.options.memory_limit is not None:
        # The variables came too late (torch was already loaded), or the limit was turned into a ratio with an
        # estimated working set: the fraction call sets the same hard limit at any time.
        MpsMemory(torch).set_fraction(high)
    runtime.report.update("memory", {"budget_bytes": budget})
    runtime.report.note(f"memory budget {gib(budget)} ({reason})")
    return budget


# --------------------------------------------------------------------------------------------------------------------
# Model facts and the analytic estimate
# --------------------------------------------------------------------------------------------------------------------

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


def config_of(model: Any) -> Any:
    """The transformers config of a model, possibly wrapped by peft."""
    for candidate in (model, getattr(model, "base_model", None), getattr(getattr(model, "base_model", None), "model", None)):
        config = getattr(candidate, "config", None)
        if config is not None and hasattr(config, "hidden_size"):
            return config
    return None


def is_checkpointing(model: Any) -> bool:
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            return True
    return False


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


def optimizer_step_bytes(facts: ModelFacts, foreach: bool) -> int:
    """Temporaries of one AdamW step: per parameter (for-loop) or for all of them at once (foreach, real MPS)."""
    return 2 * (facts.trainable_bytes if foreach else facts.largest_trainable_bytes)


def activation_bytes(
    facts: ModelFacts, batch: int, seq: int, compute_bytes: int, checkpointing: bool | None = None,
    attention_scores: bool = True,
) -> dict[str, int]:
    """Activations kept for backward (and the worst temporaries) at `batch` sequences of `seq` tokens, by part.

    Per token and layer of a LLaMA-style decoder: the residual stream and RMSNorm statistics in fp32 (trainable fp32
    embeddings make the residual fp32), the inputs and outputs of the projections (LoRA's dropout and A outputs
    included) in the compute dtype, q/k/v and their rotary copies, the MLP's gate, up, activation and product.
    Attention on MPS materialises the full score matrix in fp32 for q_len > 8 (matrix C(h)): B x heads x S x S x 4
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


Estimate = namedtuple("Estimate", "total parts micro_batch seq calibrated")
Estimate.__doc__ = """An estimated peak: total bytes, its parts by name (bytes), for micro_batch sequences of seq
tokens; calibrated: whether the transient was measured on the device."""


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
    foreach: bool = False,
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
    if calibration is not None and calibration.checkpointing == facts.checkpointing:
        transient = measured_transient(calibration, facts, micro_batch)
        # A measurement starts with no gradients; later micro-steps of a window start with all of them.
        transient += grads // 2 if accumulates else 0
        calibrated = True
    else:
        transient = grads + sum(activations.values())
        calibrated = False
    step = grads + optimizer_step_bytes(facts, foreach)
    evaluation = evaluation_bytes(facts, eval_batch, eval_seq, compute_bytes, attention_scores) if eval_batch else 0
    if calibration is not None and calibrated and calibration.analytic_per_sample:
        # The measured/analytic ratio of training carries over to evaluation's (smaller) transient.
        ratio = (transient - grads) / max(1, sum(activations.values()))
        evaluation = int(evaluation * max(ratio, 0.5))
    worst = max(transient, step, evaluation)
    parts = {
        "weights": facts.weight_bytes,
        "optimizer_state": optimizer,
        "gradients": grads,
        **{f"activations_{name}": value for name, value in activations.items()},
    }
    if calibrated:
        parts["measured_transient"] = transient
    return Estimate(facts.weight_bytes + optimizer + worst, parts, micro_batch, seq, calibrated)


# --------------------------------------------------------------------------------------------------------------------
# The split of each per-device batch
# --------------------------------------------------------------------------------------------------------------------

Split = namedtuple("Split", "micro_batch chunks")
Split.__doc__ = """How one per-device batch is computed: `chunks` forward/backward passes of at most `micro_batch`
sequences (sizes as equal as possible), their losses weighted by their share of the batch's label tokens so the
gradients are the unsplit batch's. per_device x accumulation x world size, the effective batch, is unchanged."""


def chunk_sizes(total: int, micro_batch: int) -> list[int]:
    """`total` rows in the fewest chunks of at most `micro_batch`, as equal as possible (7 by 4 -> [4, 3])."""
    if total <= 0:
        return []
    chunks = math.ceil(total / max(1, micro_batch))
    base, extra = divmod(total, chunks)
    return [base + 1] * extra + [base] * (chunks - extra)


def split_for(per_device: int, micro_batch: int) -> Split:
    sizes = chunk_sizes(per_device, micro_batch)
    return Split(max(sizes) if sizes else micro_batch, len(sizes))


def choose_split(per_device: int, estimate_for: Callable[[int], int], usable_bytes: int) -> Split | None:
    """The fewest chunks of each per-device batch whose estimated peak fits `usable_bytes`; None if one sample does
    not fit. Chunks need not divide the batch: unequal chunks are weighted exactly (see Split)."""
    for chunks in range(1, per_device + 1):
        micro = math.ceil(per_device / chunks)
        if chunks > 1 and math.ceil(per_device / (chunks - 1)) == micro:
            continue  # same largest chunk as with fewer chunks: no better
        if estimate_for(micro) <= usable_bytes:
            return split_for(per_device, micro)
    return None


def usable(budget_bytes: int, headroom: float) -> int:
    return int(budget_bytes * (1.0 - headroom))


# --------------------------------------------------------------------------------------------------------------------
# The ladder: what to give up when even one sample does not fit
# --------------------------------------------------------------------------------------------------------------------

CHECKPOINTING = "gradient_checkpointing"
FROZEN_DTYPE = "frozen_weights_dtype"


def next_rung(facts: ModelFacts, autocast_dtype: str | None, weights_dtype: str | None, tried: set) -> str | None:
    """The next thing to change when a micro-batch of 1 does not fit: gradient checkpointing, then frozen weights in
    the autocast dtype (only when the precision plan computes in it anyway and they are fp32 now), then nothing."""
    if CHECKPOINTING not in tried and not facts.checkpointing:
        return CHECKPOINTING
    if (
        FROZEN_DTYPE not in tried
        and autocast_dtype is not None
        and weights_dtype in (None, "float32")
        and facts.frozen_float32_bytes > 0
    ):
        return FROZEN_DTYPE
    return None


def fitting_sequence(estimate_at: Callable[[int], int], usable_bytes: int, longest: int) -> int | None:
    """The longest sequence (a multiple of 8, up to `longest`) at which estimate_at(seq) fits, or None."""
    low, high = 0, longest
    while high - low > 8:
        middle = (low + high) // 2
        if estimate_at(middle) <= usable_bytes:
            low = middle
        else:
            high = middle
    low = low // 8 * 8
    return low if low >= 8 and estimate_at(low) <= usable_bytes else None


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if abs(size) >= 2**30 else f"{size / 2**20:.1f} MiB"


def diagnosis(
    estimate: Estimate, budget_bytes: int, usable_bytes: int, facts: ModelFacts, tried: list[str],
    fitting_seq: int | None = None,
) -> str:
    """One message: what takes the memory, by how much the run is over, and what the user can change."""
    parts = sorted(
        ((name, value) for name, value in estimate.parts.items() if name != "measured_transient" and value > 0),
        key=lambda item: -item[1],
    )
    shown = ", ".join(f"{name.replace('_', ' ')} {_gib(value)}" for name, value in parts[:6])
    over = estimate.total - usable_bytes
    options = []
    if fitting_seq:
        options.append(f"--max_seq_length {fitting_seq} or shorter samples (the longest is {estimate.seq} tokens)")
    elif estimate.seq > 8:
        options.append(f"shorter sequences (the longest is {estimate.seq} tokens)")
    if facts.modules_to_save_bytes:
        # weights, gradients and two AdamW states for each full trainable copy
        freed = facts.modules_to_save_bytes * 4
        options.append(f"fewer --modules_to_save (they take about {_gib(freed)} with gradients and AdamW state)")
    options.append("a smaller LoRA rank or fewer LoRA target modules")
    options.append("a larger --memory-limit (up to 2x the recommended working set, at the risk of swapping)")
    options.append("a smaller model")
    done = f" after {' and '.join(tried)}" if tried else ""
    return (
        f"mps-shim: this run cannot fit in memory{done}: a micro-batch of 1 at {estimate.seq} tokens needs about "
        f"{_gib(estimate.total)} ({shown}); the budget is {_gib(budget_bytes)} ({_gib(usable_bytes)} with headroom), "
        f"{_gib(over)} over. Options: " + "; ".join(options) + ". Nothing was trained or written."
    )


# --------------------------------------------------------------------------------------------------------------------
# Loss weights of a split batch
# --------------------------------------------------------------------------------------------------------------------


def label_tokens(labels: Any, ignore_index: int = -100) -> Any:
    """Per row: the tokens that count in a causal LM loss (labels after the one-token shift, not ignore_index)."""
    return (labels[..., 1:] != ignore_index).reshape(labels.shape[0], -1).sum(dim=1)


# --------------------------------------------------------------------------------------------------------------------
# Adapters: the device's figures, and the machine's pressure
# --------------------------------------------------------------------------------------------------------------------


class DeviceMemory:
    """The Apple GPU's memory figures, real (torch.mps through device.MpsMemory) or simulated, behind one face.

    MPS has no peak counter: on a real Mac the peak is the largest of the samples taken at every tensor saved for
    backward and used in backward (`sampling()`), and at every `sample()` call."""

    def __init__(self, runtime: Any, torch: Any):
        from mps_shim.device import MpsMemory

        self.runtime = runtime
        self.torch = torch
        self.simulator = runtime.simulator
        self.mps = MpsMemory(torch)
        self._peak = 0

    @property
    def budget(self) -> int | None:
        if self.simulator is not None:
            return self.simulator.budget_bytes
        return self.runtime.report.data["memory"].get("budget_bytes")

    def allocated(self) -> int:
        if self.simulator is not None:
            return self.simulator.allocated_bytes()
        return self.mps.allocated() or 0

    def driver(self) -> int:
        if self.simulator is not None:
            return self.simulator.driver_bytes()
        return self.mps.driver() or 0

    def empty_cache(self) -> None:
        import gc

        gc.collect()
        if self.simulator is not None:
            self.simulator.empty_cache()
        else:
            self.mps.empty_cache()

    def sample(self) -> int:
        now = self.allocated()
        self._peak = max(self._peak, now)
        return now

    def reset_peak(self) -> None:
        if self.simulator is not None:
            self.simulator.reset_peak()
        self._peak = self.allocated()

    def peak(self) -> int:
        if self.simulator is not None:
            return self.simulator.peak_bytes
        return self._peak

    def sampling(self) -> Any:
        """A context in which a real device's allocation is sampled at every saved tensor (for a peak)."""
        import contextlib

        if self.simulator is not None:
            return contextlib.nullcontext()

        def pack(tensor):
            self.sample()
            return tensor

        def unpack(tensor):
            self.sample()
            return tensor

        return self.torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _psutil_reading() -> tuple[int, float]:
    import psutil

    return int(psutil.swap_memory().used), float(psutil.virtual_memory().percent)


class PressureWatch:
    """Warns once when the machine starts swapping (swap grew by `swap_growth` bytes since the start) or memory use
    passes `percent`; again only after it went back to normal. `read` returns (swap used bytes, memory percent)."""

    def __init__(self, read: Callable[[], tuple[int, float]] | None = None, swap_growth: int = 256 * MIB,
                 percent: float = 92.0):
        self.read = read or _psutil_reading
        self.swap_growth = swap_growth
        self.percent = percent
        self.baseline: int | None = None
        self.warned = False

    def check(self) -> str | None:
        try:
            swap, percent = self.read()
        except Exception:
            return None
        if self.baseline is None:
            self.baseline = swap
        grew = swap - self.baseline
        if grew >= self.swap_growth or percent >= self.percent:
            if self.warned:
                return None
            self.warned = True
            what = []
            if grew >= self.swap_growth:
                what.append(f"swap grew by {grew / MIB:.0f} MiB since training started")
            if percent >= self.percent:
                what.append(f"system memory is {percent:.0f}% used")
            return (
                "; ".join(what) + ": the machine is short of memory; training slows down. Close other apps or "
                "lower --memory-limit"
            )
        self.warned = False
        self.baseline = min(self.baseline, swap)
        return None
