"""Memory as a solved problem: budget, preflight, exact splitting, out-of-memory recovery, watch.

Unit tests of shim/memory.py's decisions, then real in-process Trainer runs of a tiny LLaMA with LoRA and
`modules_to_save` on the simulated Apple GPU with tight budgets (`memory_limit=`), on whatever stack runs them.

Weight comparisons use SGD and a tolerance relative to each tensor's scale: a split batch sums the same gradients in
another order, so float32 rounding differs at ~1e-7; AdamW's first steps divide every element's gradient by its own
magnitude, which turns that rounding into visible differences wherever a gradient is ~0 (lora_B starts at zero), and
an element-wise relative test of such values compares rounding noise. SGD keeps the comparison about the gradients.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

# tests/conftest.py imports mps_shim without activating it (MPS_SHIM=0 for that import).
import mps_shim
import mps_shim.runtime
from mps_shim.budget import HIGH_WATERMARK, LOW_WATERMARK, watermark_ratios, watermark_settings
from mps_shim.chunking import chunk_sizes, label_tokens
from mps_shim.device_memory import PressureWatch
from mps_shim.errors import MemoryPlanError, PlanReached
from mps_shim.estimate import Calibration, ModelFacts, estimate_peak, measured_transient, model_facts
from mps_shim.fit import CHECKPOINTING, FROZEN_DTYPE, choose_split, diagnosis, next_rung
from mps_shim.memory_guard import STATE
from mps_shim.oom import is_out_of_memory

from support import REPO, clean_env, python, read_json, run

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SIMULATE = "macos=15.1,torch=2.13,memory=16GiB"
MIB = 2**20
VOCAB = 256


# ---------------------------------------------------------------------------------------------------------------------
# Pure decisions
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "MPS backend out of memory (MPS allocated: 9.02 GB, other allocations: 0 bytes, max allowed: 9.07 GB). Tried to "
        "allocate 256.00 MB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory "
        "allocations (may cause system failure).",
        "MPS backend out of memory (MPS allocated: 240.10 MiB, other allocations: 0 bytes, max allowed: 242.48 MiB). "
        "Tried to allocate 4.00 MiB on private pool.",
        "MPS backend out of memory (MPS allocated: 1.00 GiB, other allocations: 2.00 KiB). Tried to allocate 1024 bytes "
        "on shared pool.",
        "Invalid buffer size: 12.00 GB",
        "CUDA out of memory. Tried to allocate 2.00 GiB",
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 8",
    ],
)
def test_every_out_of_memory_text_is_recognised(text):
    assert is_out_of_memory(RuntimeError(text))


def test_out_of_memory_types_and_non_matches():
    assert is_out_of_memory(torch.OutOfMemoryError("whatever"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("MPS backend out of memory"))  # not what torch raises


def test_watermarks_follow_the_budget_and_stay_consistent():
    recommended = 10 * 2**30
    high, low, note = watermark_ratios(recommended, recommended)
    assert (high, note) == (1.0, None) and 0 < low < high and low == pytest.approx(1.0 * 1.4 / 1.7)
    high, low, _ = watermark_ratios(recommended // 4, recommended)
    assert high == 0.25 and low <= high
    high, low, note = watermark_ratios(3 * recommended, recommended)
    assert high == 2.0 and low <= high and "at most 2.0x" in note


def test_watermark_settings_respect_the_user_but_keep_the_allocator_alive():
    recommended = 8 * 2**30
    settings, _ = watermark_settings({}, recommended, recommended)
    assert [s[0] for s in settings] == [HIGH_WATERMARK, LOW_WATERMARK]
    assert float(settings[1][1]) <= float(settings[0][1]) == 1.0
    # A lone HIGH below torch's default LOW (1.4) makes MPSAllocator fail at start-up: the LOW follows it.
    settings, _ = watermark_settings({HIGH_WATERMARK: "1.0"}, recommended, recommended)
    assert len(settings) == 1 and settings[0][0] == LOW_WATERMARK and float(settings[0][1]) < 1.0
    assert watermark_settings({HIGH_WATERMARK: "1.6"}, recommended, recommended)[0] == []
    settings, notes = watermark_settings({HIGH_WATERMARK: "1.0", LOW_WATERMARK: "1.2"}, recommended, recommended)
    assert settings == [] and "refuse" in notes[0]


def test_chunks_cover_the_batch_and_keep_the_effective_batch():
    assert chunk_sizes(8, 4) == [4, 4]
    assert chunk_sizes(7, 4) == [4, 3]
    assert chunk_sizes(6, 4) == [3, 3]
    assert chunk_sizes(5, 1) == [1] * 5
    for total in range(1, 20):
        for micro in range(1, total + 1):
            sizes = chunk_sizes(total, micro)
            assert sum(sizes) == total and max(sizes) <= micro and max(sizes) - min(sizes) <= 1


def test_choose_split_takes_the_fewest_chunks_that_fit():
    per_sample, fixed = 100, 1000
    estimate = lambda micro: fixed + per_sample * micro  # noqa: E731
    assert choose_split(8, estimate, 10_000) == (8, 1)
    assert choose_split(8, estimate, 1_450) == (4, 2)
    assert choose_split(6, estimate, 1_450) == (3, 2)
    assert choose_split(8, estimate, 1_100) == (1, 8)
    assert choose_split(8, estimate, 1_099) is None


def tiny_facts(**changes):
    facts = ModelFacts(
        weight_bytes=400 * MIB, frozen_bytes=300 * MIB, frozen_float32_bytes=300 * MIB, trainable_bytes=100 * MIB,
        trainable_count=25 * MIB, largest_trainable_bytes=40 * MIB, modules_to_save_bytes=80 * MIB,
        modules_to_save_count=20 * MIB, hidden=512, intermediate=2048, layers=8, heads=8, kv_heads=2, vocab=32000,
        checkpointing=False,
    )
    return facts._replace(**changes)


def test_estimate_grows_with_batch_and_sequence_and_counts_the_attention_scores():
    facts = tiny_facts()
    small = estimate_peak(facts, 1, 512, 2)
    assert estimate_peak(facts, 2, 512, 2).total > small.total
    longer = estimate_peak(facts, 1, 2048, 2)
    assert longer.parts["activations_attention_scores"] == 16 * longer.parts["activations_attention_scores"] // 16
    assert longer.parts["activations_attention_scores"] == 8 * 8 * 2048 * 2048 * 4  # layers x heads x S x S x fp32
    assert small.parts["optimizer_state"] == 8 * facts.trainable_count  # AdamW: two fp32 states
    checkpointed = estimate_peak(facts._replace(checkpointing=True), 1, 2048, 2)
    assert checkpointed.total < longer.total


def test_an_estimates_parts_add_up_to_its_total_whatever_phase_peaks():
    facts = tiny_facts()
    calibration = Calibration({1: 300 * MIB, 2: 500 * MIB}, 200 * MIB, False)
    estimates = {
        "analytic training": estimate_peak(facts, 1, 2048, 2),
        "measured training": estimate_peak(facts, 2, 2048, 2, calibration=calibration),
        "optimizer step": estimate_peak(facts._replace(largest_trainable_bytes=4000 * MIB), 1, 8, 2),
        "evaluation": estimate_peak(facts, 1, 8, 2, eval_batch=64, eval_seq=2048),
    }
    assert [e.phase for e in estimates.values()] == ["training", "training", "optimizer_step", "evaluation"]
    for name, estimate in estimates.items():
        assert sum(estimate.parts.values()) == estimate.total, name
    # The diagnosis's "about X" is then the sum of the parts it lists.
    text = diagnosis(estimates["measured training"], 2**30, int(0.9 * 2**30), facts, [])
    assert "about 1.12 GiB (activations measured 450.0 MiB, weights 400.0 MiB, optimizer state 200.0 MiB, gradients 100.0 MiB)" in text
    assert not text.startswith("mps-shim")


def test_calibration_is_a_line_through_the_measurements():
    facts = tiny_facts()
    two = Calibration({1: 300, 2: 500}, 1000, False)
    assert measured_transient(two, facts, 4) == 900
    one = Calibration({1: 300 * MIB}, 1000, False)
    assert measured_transient(one, facts, 2) == 100 * MIB + 2 * 200 * MIB  # gradients once, activations per sample


def test_ladder_checkpointing_then_smaller_frozen_weights_then_nothing():
    facts = tiny_facts()
    assert next_rung(facts, "bfloat16", "float32", set()) == CHECKPOINTING
    assert next_rung(facts, "bfloat16", "float32", {CHECKPOINTING}) == FROZEN_DTYPE
    assert next_rung(facts, "bfloat16", "float32", {CHECKPOINTING, FROZEN_DTYPE}) is None
    assert next_rung(facts, None, "float32", {CHECKPOINTING}) is None  # fp32 plan: no autocast to compute in
    assert next_rung(facts, "bfloat16", "bfloat16", {CHECKPOINTING}) is None  # already half precision
    assert next_rung(facts._replace(checkpointing=True), "float16", None, set()) == FROZEN_DTYPE


def test_diagnosis_says_what_takes_the_memory_by_how_much_and_the_options():
    facts = tiny_facts()
    estimate = estimate_peak(facts, 1, 4096, 2)
    text = diagnosis(estimate, 1 * 2**30, int(0.9 * 2**30), facts, [CHECKPOINTING], 1024)
    assert "cannot fit" in text and "over" in text and "weights" in text and "attention scores" in text
    assert "--max_seq_length 1024" in text and "--modules_to_save" in text and "after gradient_checkpointing" in text


def test_label_tokens_count_after_the_causal_shift():
    labels = torch.tensor([[-100, 5, 6, -100], [1, 2, -100, -100], [-100, -100, -100, -100]])
    assert label_tokens(labels).tolist() == [2, 1, 0]


def test_pressure_watch_warns_once_per_episode():
    readings = iter([(0, 50.0), (100 * MIB, 60.0), (400 * MIB, 60.0), (500 * MIB, 70.0), (0, 40.0), (0, 95.0)])
    watch = PressureWatch(read=lambda: next(readings))
    results = [watch.check() for _ in range(6)]
    assert results[0] is None and results[1] is None
    assert "swap grew by 400 MiB" in results[2]
    assert results[3] is None  # still the same episode
    assert results[4] is None
    assert "95% used" in results[5]


# ---------------------------------------------------------------------------------------------------------------------
# Real runs on the simulated Apple GPU
# ---------------------------------------------------------------------------------------------------------------------


class Samples(torch.utils.data.Dataset):
    """n sequences; the first token of sample i is 3 + i, so the model's inputs tell which samples it saw."""

    def __init__(self, n=32, lengths=(24, 64), seed=1):
        generator = torch.Generator().manual_seed(seed)
        self.items = []
        for index in range(n):
            length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=generator))
            ids = torch.randint(3 + n, VOCAB, (length,), generator=generator)
            ids[0] = 3 + index
            labels = ids.clone()
            labels[: length // 3] = -100
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


class Collator:
    """Right-pads a batch; `long_batches` are padded (attention mask 0, labels -100) to `long_length` tokens."""

    def __init__(self, long_batches=(), long_length=0):
        self.calls = 0
        self.long_batches = set(long_batches)
        self.long_length = long_length

    def __call__(self, items):
        length = max(len(item["input_ids"]) for item in items)
        if self.calls in self.long_batches:
            length = max(length, self.long_length)
        self.calls += 1
        ids = torch.zeros(len(items), length, dtype=torch.long)
        labels = torch.full((len(items), length), -100)
        mask = torch.zeros(len(items), length, dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = item["input_ids"], item["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def tiny_lora_model(seed=0, layers=2, hidden=64):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024,
    )
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
        modules_to_save=["lm_head"],
    )
    return peft.get_peft_model(model, lora)


@pytest.fixture
def shim(monkeypatch):
    """Activates the shim in this process on the simulated Mac; deactivated after the test."""
    for variable in ("MPS_SHIM_PLAN_ONLY", "MPS_SHIM_REPORT", "MPS_SHIM_MEMORY_LIMIT", "MPS_SHIM_SIMULATE"):
        monkeypatch.delenv(variable, raising=False)

    def start(limit=None, precision="fp32"):
        mps_shim.deactivate()
        mps_shim.activate(simulate=SIMULATE, memory_limit=limit, precision=precision, log_level="quiet")

    yield start
    mps_shim.deactivate()


def train(shim, tmp_path, limit=None, per_device=8, accumulation=2, epochs=1, dataset=None, collator=None,
          eval_dataset=None, eval_batch=8, precision="fp32", optim="sgd", model_hook=None, callbacks=(), **extra):
    shim(limit, precision)
    model = tiny_lora_model(**extra.pop("model", {}))
    if model_hook is not None:
        model_hook(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"out-{limit}"), per_device_train_batch_size=per_device,
        per_device_eval_batch_size=eval_batch, gradient_accumulation_steps=accumulation, num_train_epochs=epochs,
        learning_rate=0.5 if optim == "sgd" else 1e-3, optim=optim, logging_steps=1, save_strategy="no", report_to=[],
        seed=0, disable_tqdm=True, dataloader_num_workers=0, bf16=precision == "bf16", **extra,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=dataset or Samples(), eval_dataset=eval_dataset,
        data_collator=collator or Collator(), callbacks=list(callbacks),
    )
    trainer.train()
    report = mps_shim.report()
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return trainer, report, weights


def assert_same_weights(expected, actual, rtol=1e-5):
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        scale = value.abs().max().item()
        difference = (actual[name] - value).abs().max().item()
        assert difference <= rtol * scale, f"{name}: max difference {difference:.3g} against scale {scale:.3g}"


def events(report, kind):
    return [event for event in report["events"] if event["kind"] == kind]


@pytest.fixture(scope="module")
def unconstrained(tmp_path_factory):
    """The reference run: no memory pressure, per-device 8 x accumulation 2 (under the shim, the same patches)."""
    mps_shim.deactivate()
    mps_shim.activate(simulate=SIMULATE, precision="fp32", log_level="quiet")
    try:
        trainer, report, weights = train(lambda *a: None, tmp_path_factory.mktemp("reference"))
    finally:
        mps_shim.deactivate()
    assert report["batch"]["micro_batch"] == 8 and not events(report, "oom_recovered")
    return trainer, report, weights


def test_a_run_over_budget_is_split_and_ends_with_the_unconstrained_weights(shim, tmp_path, unconstrained):
    reference, reference_report, reference_weights = unconstrained
    full = reference_report["memory"]["estimated_peak_bytes"]
    trainer, report, weights = train(shim, tmp_path, limit=int(full * 0.75))
    assert report["batch"]["micro_batch"] < 8 and report["batch"]["chunks_per_batch"] >= 2
    assert report["batch"]["effective_batch"] == 16
    assert [c for c in report["changes"] if c["target"] == "per-device batch"]
    assert report["memory"]["estimated_peak_bytes"] <= report["memory"]["budget_bytes"]
    assert trainer.state.global_step == reference.state.global_step
    assert_same_weights(reference_weights, weights)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    expected = [h["loss"] for h in reference.state.log_history if "loss" in h]
    assert losses == pytest.approx(expected, rel=1e-5)


def test_training_logs_carry_memory_for_tensorboard_and_wandb(shim, tmp_path, unconstrained):
    trainer, report, _ = unconstrained
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged
    for entry in logged:
        assert {"memory/allocated_mib", "memory/driver_mib", "memory/budget_mib"} <= entry.keys()
        assert 0 < entry["memory/allocated_mib"] <= entry["memory/budget_mib"]


class SeenSamples:
    """Which samples completed a forward and backward, per epoch: the first token of each row, recorded when the
    gradient reaches the first layer's LoRA output (the end of backward)."""

    def __init__(self, model):
        self.current = []
        self.done: list[tuple[int, int]] = []
        self.epoch = None  # None until training starts: the preflight's synthetic batches are not samples
        base = model.base_model.model.model
        base.embed_tokens.register_forward_pre_hook(self._inputs)
        base.layers[0].self_attn.q_proj.register_forward_hook(self._output)

    def _inputs(self, module, args):
        self.current = (args[0][:, 0] - 3).tolist()

    def _output(self, module, args, output):
        if output.requires_grad and self.epoch is not None:
            rows, epoch = list(self.current), self.epoch
            output.register_hook(lambda grad: self.done.extend((epoch, row) for row in rows) or None)


class EpochCounter(transformers.TrainerCallback):
    def __init__(self, seen_holder):
        self.seen_holder = seen_holder
        self.steps = []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.seen_holder[0].epoch = round(state.epoch or 0)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_an_out_of_memory_mid_run_recovers_without_restarting_and_sees_each_sample_once(shim, tmp_path, unconstrained):
    reference_report = unconstrained[1]
    holder = [None]
    counter = EpochCounter(holder)

    def hook(model):
        holder[0] = SeenSamples(model)

    limit = int(reference_report["memory"]["estimated_peak_bytes"] * 1.2)  # 8 x 64 tokens fits; 8 x 384 does not
    collator = Collator(long_batches={3}, long_length=384)
    trainer, report, weights = train(
        shim, tmp_path, limit=limit, epochs=2, collator=collator, model_hook=hook, callbacks=[counter]
    )
    recovered = events(report, "oom_recovered")
    assert recovered and "MPS backend out of memory" in recovered[0]["detail"]
    assert recovered[0]["step"] == 1  # the 4th batch is the 2nd micro-step of optimizer step 2
    assert counter.steps == [1, 2, 3, 4]  # 2 epochs x 32 samples / (8 x 2): no restart, no step lost
    seen = holder[0].done
    for epoch in (0, 1):
        rows = sorted(row for e, row in seen if e == epoch)
        assert rows == list(range(32)), f"epoch {epoch}: each sample exactly once"
    assert report["batch"]["micro_batch"] < 8  # the finer split is remembered

    # The same run without memory pressure ends with the same weights.
    collator = Collator(long_batches={3}, long_length=384)
    reference, _, reference_weights = train(shim, tmp_path, limit=None, epochs=2, collator=collator)
    assert_same_weights(reference_weights, weights)


def test_an_out_of_memory_half_way_through_backward_counts_no_gradient_twice(shim, tmp_path, unconstrained):
    """The second micro-step of the first window fails after lm_head got its gradient: the re-run must not add it
    again, and must keep the first micro-step's gradients."""
    _, _, reference_weights = unconstrained
    state = {"backwards": 0, "raised": False}

    def inject(model):
        layer = model.base_model.model.model.layers[-1]

        def forward_hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.requires_grad and hidden.shape[0] > 1:
                def fail_once(grad):
                    state["backwards"] += 1
                    if state["backwards"] == 2 and not state["raised"]:
                        state["raised"] = True
                        raise RuntimeError(
                            "MPS backend out of memory (MPS allocated: 3.00 MiB, other allocations: 0 bytes, max "
                            "allowed: 4.00 MiB). Tried to allocate 2.00 MiB on private pool. Use "
                            "PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory allocations (may "
                            "cause system failure)."
                        )
                hidden.register_hook(fail_once)

        layer.register_forward_hook(forward_hook)

    trainer, report, weights = train(shim, tmp_path, model_hook=inject)
    assert state["raised"] and events(report, "oom_recovered")
    assert_same_weights(reference_weights, weights)


def test_an_impossible_run_stops_before_training_with_one_diagnosis(shim, tmp_path):
    output = tmp_path / "out-impossible"
    output.mkdir()
    (output / "keep.txt").write_text("the user's file")

    model = tiny_lora_model()
    shim(int(model_facts(model).weight_bytes * 1.3))  # the weights fit, not with one sequence's activations
    args = transformers.TrainingArguments(
        output_dir=str(output), per_device_train_batch_size=4, num_train_epochs=1, report_to=[], save_strategy="steps",
        save_steps=1, optim="sgd", disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Samples(), data_collator=Collator())
    with pytest.raises(MemoryPlanError) as stopped:
        trainer.train()
    text = str(stopped.value)
    assert stopped.value.exit_status not in (0, None)
    assert text.startswith("this run cannot fit in memory after gradient_checkpointing")
    assert "over" in text and "weights" in text and "--modules_to_save" in text
    assert trainer.state.global_step == 0
    assert sorted(p.name for p in output.iterdir()) == ["keep.txt"]
    report = mps_shim.report()
    assert events(report, "memory_plan_failed")
    assert [c for c in report["changes"] if c["target"] == "gradient checkpointing"]


def test_gradient_checkpointing_when_one_sample_does_not_fit(shim, tmp_path):
    long = Samples(n=8, lengths=(200, 256))
    reference, reference_report, reference_weights = train(
        shim, tmp_path, per_device=1, accumulation=4, dataset=long
    )
    estimate = reference_report["memory"]["estimated_peak_bytes"]
    parts = reference_report["memory"]["estimate_parts"]
    weights_etc = parts["weights"] + parts["optimizer_state"]
    limit = int((weights_etc + 0.6 * (estimate - weights_etc)) / 0.9)
    trainer, report, weights = train(shim, tmp_path, limit=limit, per_device=1, accumulation=4, dataset=long)
    assert [c for c in report["changes"] if c["target"] == "gradient checkpointing" and c["to"] is True]
    assert report["memory"]["estimated_peak_bytes"] <= report["memory"]["usable_bytes"]
    assert trainer.state.global_step == reference.state.global_step
    assert_same_weights(reference_weights, weights)


def test_frozen_weights_in_the_autocast_dtype_when_checkpointing_is_not_enough(shim, tmp_path):

    model = tiny_lora_model(layers=4, hidden=256)
    shim(int(model_facts(model).weight_bytes * 1.2), precision="bf16")  # fp32 weights fit, not with a step
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=3,
        report_to=[], bf16=True, optim="sgd", disable_tqdm=True, save_strategy="no",
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Samples(n=8, lengths=(24, 32)), data_collator=Collator()
    )
    trainer.train()
    report = mps_shim.report()
    changed = {c["target"]: c["to"] for c in report["changes"]}
    assert changed.get("gradient checkpointing") is True and changed.get("frozen weights dtype") == "bfloat16"
    assert report["precision"]["weights_dtype"] == "bfloat16" and trainer.state.global_step == 3
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)


def test_an_evaluation_out_of_memory_recovers_with_the_same_loss(shim, tmp_path, unconstrained):
    evaluation = Samples(n=24, lengths=(200, 256), seed=7)
    limit = int(unconstrained[1]["memory"]["estimated_peak_bytes"] * 1.2)
    trainer, _, _ = train(shim, tmp_path, limit=limit, eval_batch=24)
    loss = trainer.evaluate(eval_dataset=evaluation)["eval_loss"]
    recovered = [e for e in events(mps_shim.report(), "oom_recovered") if e["detail"].startswith("evaluation")]
    assert recovered and "MPS backend out of memory" in recovered[0]["detail"]
    # The same weights evaluated in one piece, with memory to spare.
    mps_shim.runtime.current().simulator.set_memory_fraction(1.0)
    getattr(trainer, STATE).eval_micro_batch = None
    count = len(events(mps_shim.report(), "oom_recovered"))
    expected = trainer.evaluate(eval_dataset=evaluation)["eval_loss"]
    assert len(events(mps_shim.report(), "oom_recovered")) == count
    assert loss == pytest.approx(expected, rel=1e-5)


def test_plan_only_fills_the_memory_plan_and_exits_zero(shim, tmp_path, monkeypatch, unconstrained):
    full = unconstrained[1]["memory"]["estimated_peak_bytes"]
    monkeypatch.setenv("MPS_SHIM_PLAN_ONLY", "1")
    with pytest.raises(PlanReached) as stopped:
        train(shim, tmp_path, limit=int(full * 0.75))
    assert stopped.value.exit_status == 0
    report = mps_shim.report()
    assert report["memory"]["estimated_peak_bytes"] and report["memory"]["budget_bytes"]
    assert report["batch"]["micro_batch"] < 8


def test_watermarks_are_set_before_torch_and_make_the_budget():
    code = (
        "import os, mps_shim, torch\n"
        "from mps_shim import runtime\n"
        "sim = runtime.current().simulator\n"
        "print(os.environ['PYTORCH_MPS_HIGH_WATERMARK_RATIO'], os.environ['PYTORCH_MPS_LOW_WATERMARK_RATIO'], "
        "sim.budget_bytes, mps_shim.report()['memory']['budget_bytes'])\n"
    )
    result = python(code, env=clean_env(MPS_SHIM_SIMULATE="macos=15.1,torch=2.13,memory=16GiB",
                                        MPS_SHIM_MEMORY_LIMIT="2GiB"))
    assert result.returncode == 0, result.stderr
    high, low, simulated, reported = result.stdout.split()
    recommended = 16 * 2**30 * 2 // 3
    assert float(high) == pytest.approx(2 * 2**30 / recommended) and float(low) < float(high)
    assert abs(int(simulated) - 2 * 2**30) < 2**20 and int(reported) == int(simulated)
    result = python(code.replace("mps_shim, torch", "torch, mps_shim").replace(
        "os.environ['PYTORCH_MPS_HIGH_WATERMARK_RATIO'], os.environ['PYTORCH_MPS_LOW_WATERMARK_RATIO']",
        "'-', '-'"), env=clean_env(MPS_SHIM_SIMULATE="1", MPS_SHIM_MEMORY_LIMIT="2GiB"))
    assert result.returncode == 0, result.stderr
    assert "not set: torch was imported before mps_shim" in result.stderr
    assert abs(int(result.stdout.split()[2]) - 2 * 2**30) < 2**20  # applied late, as a memory fraction


@pytest.fixture
def clean_example(tmp_path):
    """The example's data (JSON files only: no token caches a previous run left next to them) and its tiny model
    built from that data."""
    import shutil
    import subprocess

    data = tmp_path / "data"
    (data / "sft").mkdir(parents=True)
    for source in sorted((REPO / "examples" / "data" / "sft").glob("*.json")):
        shutil.copy(source, data / "sft" / source.name)
    shutil.copy(REPO / "examples" / "data" / "validation.json", data / "validation.json")
    model = tmp_path / "llama3-tiny"
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "tiny_model" / "build_tiny_model.py"), "--output", str(model),
         "--data-dir", str(data)], check=True, capture_output=True, text=True,
    )
    return model, data / "sft", data / "validation.json"


def test_the_estimate_is_within_20_percent_of_the_measured_peak_on_the_example(clean_example, tmp_path):
    tiny_model_dir, dataset_dir, validation_file = clean_example
    report_path = tmp_path / "report.json"
    environment = clean_env(
        PRETRAINED_MODEL=str(tiny_model_dir), DATASET_DIR=str(dataset_dir), VALIDATION_FILE=str(validation_file),
        OUTPUT_DIR=str(tmp_path / "out"), MAX_STEPS="4", EVAL_STEPS="2", SAVE_STEPS="100",
        PREPROCESSING_NUM_WORKERS="1", SEED="1",
    )
    result = run(
        ["mps-shim", "--simulate", SIMULATE, "--report", report_path, "--log-level", "quiet", "sh",
         REPO / "examples" / "sft" / "run_sft.sh"],
        env=environment, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    memory = read_json(report_path)["memory"]
    estimated, measured = memory["estimated_peak_bytes"], memory["measured_peak_bytes"]
    assert estimated and measured
    assert abs(estimated - measured) <= 0.2 * measured, (estimated, measured)


def test_a_limit_above_the_macs_memory_is_capped_there_with_one_warning():
    code = (
        "import mps_shim, torch\n"
        "from mps_shim import runtime\n"
        "print(runtime.current().budget.bytes, runtime.current().simulator.budget_bytes)\n"
    )
    result = python(code, env=clean_env(MPS_SHIM_SIMULATE="macos=15.1,torch=2.13,memory=16GiB",
                                        MPS_SHIM_MEMORY_LIMIT="1000TiB"))
    assert result.returncode == 0, result.stderr
    budget, simulated = (int(value) for value in result.stdout.split())
    assert abs(budget - 16 * 2**30) < 2**20 and budget == simulated  # what is enforced is what is said
    said = [line for line in result.stderr.splitlines() if "budget" in line or "memory limit" in line]
    capped = [line for line in said if "capped" in line]
    assert len(capped) == 1 and "1000.00 TiB is more than this Mac's 16.00 GiB of memory" in capped[0], said
    assert all("2.0x" not in line for line in said), said  # no second, contradicting budget


def test_a_real_mac_is_estimated_without_foreach_temporaries(tmp_path):
    # torch has no foreach kernels for mps (evidence/torch-macos.json): an optimizer step on a Mac holds temporaries
    # for one parameter at a time, on the real device as on the simulated one.
    import types

    from mps_shim.preflight import Preflight
    from mps_shim.report import Report

    mps_shim.deactivate()
    model = tiny_lora_model()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, report_to=[])
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Samples(n=2, lengths=(2, 2)),
                                   data_collator=Collator())
    largest = max(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    for simulator in (None, object()):
        runtime = types.SimpleNamespace(simulator=simulator, precision=types.SimpleNamespace(plan=None),
                                        report=Report(None))
        estimate = Preflight(runtime, trainer, None, 2**30, 2**29).estimate(None, 1)
        assert estimate.phase == "optimizer_step", estimate
        assert estimate.parts["optimizer_step_temporaries"] == 2 * largest
