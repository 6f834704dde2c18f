"""Long runs on the simulated Mac: a bounded number of batch shapes (no driver-memory creep from MPS's graph cache),
the cache released when it runs far above the live tensors, tokens per second, fused AdamW, throttling.

The creep runs charge each new op signature `graph_entry` bytes of driver memory (shim/simulated_memory.py), as MPS's
graph cache does; the other tests leave it at 0.

Loss comparisons between a bucketed and an unbucketed run use rel=1e-6: the padded positions add no label token and no
attention to any real token, so the loss is the same sum over the same tokens; what may differ is float32 rounding,
because kernels of other shapes (a longer sequence dimension) sum in another order (measured: at most ~3e-7).
"""
from __future__ import annotations

import pickle

import pytest
import torch

import mps_shim
import mps_shim.runtime
from mps_shim import memory_guard, shapes, throughput
from mps_shim import cache_policy
from mps_shim.cache_policy import release_reason
from mps_shim.preflight import longest_sequence
from mps_shim.report import Report

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SIMULATE = "macos=15.1,torch=2.13,memory=16GiB"
VOCAB = 256
GRAPH_ENTRY = 55_000  # bytes of one cached MPS graph (docs/mps-facts.md, "Long runs")
CREEP = f"{SIMULATE},graph_entry=55KB"


class Samples(torch.utils.data.Dataset):
    def __init__(self, n=48, lengths=(8, 96), seed=1):
        generator = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=generator))
            ids = torch.randint(3, VOCAB, (length,), generator=generator)
            labels = ids.clone()
            labels[: length // 3] = -100
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def collate(items):
    """Right padding to the batch's longest row."""
    length = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    labels = torch.full((len(items), length), -100)
    mask = torch.zeros(len(items), length, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = item["input_ids"], item["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=1024,
    )
    config._attn_implementation = "sdpa"
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                           target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"])
    return peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)


class DriverWatch(transformers.TrainerCallback):
    """The simulated driver's total and its graph cache after every optimizer step."""

    def __init__(self):
        self.driver, self.graphs = [], []

    def on_step_end(self, args, state, control, **kwargs):
        memory = mps_shim.runtime.current().simulator.memory
        self.driver.append(memory.driver_bytes())
        self.graphs.append(memory.graph_entries)


@pytest.fixture
def shim(monkeypatch):
    for variable in ("MPS_SHIM_PLAN_ONLY", "MPS_SHIM_REPORT", "MPS_SHIM_MEMORY_LIMIT", "MPS_SHIM_SIMULATE"):
        monkeypatch.delenv(variable, raising=False)

    def start(limit=None, simulate=SIMULATE):
        mps_shim.deactivate()
        mps_shim.activate(simulate=simulate, memory_limit=limit, precision="fp32", log_level="quiet")

    yield start
    mps_shim.deactivate()


def train(tmp_path, dataset=None, per_device=4, epochs=2, optim="sgd", callbacks=(), max_steps=-1):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=per_device, num_train_epochs=epochs,
        max_steps=max_steps, learning_rate=0.5 if optim == "sgd" else 1e-3, optim=optim, logging_steps=1,
        save_strategy="no", report_to=[], seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=tiny_model(), args=args, train_dataset=dataset or Samples(),
                                   data_collator=collate, callbacks=list(callbacks))
    trainer.train()
    return trainer, mps_shim.report()


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# -- the simulated graph cache ----------------------------------------------------------------------------------------


def test_the_graph_entry_cost_is_a_profile_setting_off_by_default(shim):
    from mps_shim.config import load_options, parse_simulation, to_environ

    assert parse_simulation(SIMULATE, "MPS_SHIM_SIMULATE").graph_entry_bytes == 0
    options = load_options({"MPS_SHIM_SIMULATE": CREEP})
    assert options.simulate.graph_entry_bytes == GRAPH_ENTRY
    assert load_options({"MPS_SHIM_SIMULATE": to_environ(options)["MPS_SHIM_SIMULATE"]}).simulate == options.simulate
    shim(simulate=CREEP)
    assert mps_shim.runtime.current().simulator.memory.graph_entry_bytes == GRAPH_ENTRY
    shim()
    assert mps_shim.runtime.current().simulator.memory.graph_entry_bytes == 0


def test_each_new_op_signature_costs_driver_memory_that_empty_cache_keeps(shim):
    shim(simulate=f"{SIMULATE},graph_entry=1000")
    runtime = mps_shim.runtime.current()
    simulator = runtime.simulator
    runtime.place(torch.nn.Linear(4, 4))
    x = torch.ones(8, 4)
    torch.relu(x)  # outside device work (the collator, the shim's checks): nothing is compiled
    assert simulator.memory.graph_entries == 0
    with simulator.device_work():
        torch.relu(x)
        torch.relu(x + 1)  # add is new, relu of the same shape is not
        after_first = simulator.memory.other_bytes
        torch.relu(torch.ones(9, 4))  # a new shape: new graphs (ones, relu)
    assert after_first == 2000 and simulator.memory.other_bytes == 4000
    driver = simulator.driver_bytes()
    simulator.empty_cache()
    assert simulator.memory.other_bytes == 4000 and simulator.driver_bytes() >= 4000
    assert simulator.driver_bytes() <= driver


# -- buckets: pure ----------------------------------------------------------------------------------------------------


def test_bucket_lengths_are_few_end_at_the_longest_and_hold_every_length():
    for longest in (1, 7, 8, 100, 157, 2048, 4097):
        buckets = shapes.bucket_lengths(longest)
        assert 1 <= len(buckets) <= shapes.MAX_BUCKETS and buckets[-1] == longest and buckets == sorted(set(buckets))
        for length in range(1, longest + 1):
            bucket = shapes.bucket_for(length, buckets)
            assert length <= bucket <= longest and bucket - length <= max(8, -(-longest // 8) + 8)
    assert shapes.bucket_for(300, [64, 128]) == 512  # past the last bucket: powers of two, still few shapes
    assert shapes.bucket_for(300, [64, 128], cap=400) == 400  # but not past the model's positions
    assert shapes.bucket_for(500, [64, 128], cap=400) == 500


def test_padding_is_on_the_right_and_masked_and_a_left_padded_batch_is_left_alone():
    batch = collate(Samples(n=3).items)
    length = batch["input_ids"].shape[1]
    padded, why = shapes.pad_batch(batch, lambda n: n + 5, pad_token_id=7)
    assert why is None and padded["input_ids"].shape == (3, length + 5)
    assert (padded["input_ids"][:, length:] == 7).all() and (padded["attention_mask"][:, length:] == 0).all()
    assert (padded["labels"][:, length:] == -100).all()
    for key in batch:
        assert torch.equal(padded[key][:, :length], batch[key])
    left = {key: value.flip(1) for key, value in batch.items()}
    assert shapes.pad_batch(left, lambda n: n + 5, 0) == (None, "left padding: added positions would be masked "
                                                                   "attention rows")
    unknown = {**batch, "pixel_mask": torch.ones_like(batch["input_ids"])}
    assert shapes.pad_batch(unknown, lambda n: n + 5, 0)[0] is None


def test_the_bucketing_collator_survives_spawned_dataloader_workers():
    collator = shapes.BucketingCollator(collate, [16, 32, 48], pad_token_id=0)
    copy = pickle.loads(pickle.dumps(collator))  # what a `spawn` worker (macOS's default start method) receives
    assert copy(Samples(n=2, lengths=(20, 20)).items)["input_ids"].shape == (2, 32)
    loader = torch.utils.data.DataLoader(Samples(n=8, lengths=(5, 40)), batch_size=4, collate_fn=collator,
                                         num_workers=2, multiprocessing_context="spawn")
    assert {batch["input_ids"].shape[1] for batch in loader} <= {16, 32, 48}


def test_a_padded_batch_has_the_same_loss_on_a_real_model():
    model = tiny_model().eval()
    batch = collate(Samples(n=4).items)
    padded, _ = shapes.pad_batch(batch, lambda n: n + 37, 0)
    with torch.no_grad():
        expected, actual = model(**batch).loss.item(), model(**padded).loss.item()
    assert actual == pytest.approx(expected, rel=1e-6)


def test_the_preflight_plans_for_the_bucket_the_longest_row_lands_in():
    data = Samples(n=10, lengths=(10, 50))
    longest = longest_sequence(data, collate)
    collator = shapes.BucketingCollator(collate, [16, 64], 0)
    assert longest <= 50 and longest_sequence(data, collator) == 64


def test_data_of_unknown_length_is_padded_to_powers_of_two_within_the_models_positions():
    import types

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(Samples(n=4).items)

    runtime = types.SimpleNamespace(report=Report(None))
    trainer = types.SimpleNamespace(data_collator=collate, train_dataset=Stream(), eval_dataset=None,
                                    model=tiny_model(), processing_class=None)
    restore = shapes.install(runtime, trainer)
    assert [c["to"] for c in runtime.report.data["changes"]] == ["to the next power of two tokens"]
    assert trainer.data_collator(Samples(n=2, lengths=(40, 40)).items)["input_ids"].shape == (2, 64)
    # Past 1024 (the model's max_position_embeddings) a batch keeps its own length instead of the next power, 2048.
    assert trainer.data_collator(Samples(n=2, lengths=(1030, 1030)).items)["input_ids"].shape == (2, 1030)
    restore()
    assert trainer.data_collator is collate


# -- buckets: training on the simulated Mac ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def creep_runs(tmp_path_factory):
    """The same mixed-length run (96 samples of 8-96 tokens, 2 epochs) with and without the shim's buckets, MPS's
    graph cache charged at 55 KB an entry."""
    runs = {}
    for name, buckets in (("bucketed", shapes.MAX_BUCKETS), ("unbucketed", 0)):
        mps_shim.deactivate()
        mps_shim.activate(simulate=CREEP, precision="fp32", log_level="quiet")
        original, shapes.MAX_BUCKETS = shapes.MAX_BUCKETS, buckets
        watch = DriverWatch()
        try:
            trainer, report = train(tmp_path_factory.mktemp(name), dataset=Samples(n=96), callbacks=[watch])
        finally:
            shapes.MAX_BUCKETS = original
            mps_shim.deactivate()
        runs[name] = (trainer, report, watch)
    return runs


def test_driver_memory_is_flat_over_a_long_mixed_length_run_with_buckets_and_grows_without(creep_runs):
    trainer, report, watch = creep_runs["bucketed"]
    _, plain_report, plain = creep_runs["unbucketed"]
    half = len(watch.driver) // 2
    assert len(watch.driver) == 48
    # With buckets: every shape was compiled in the first half; the second half adds no graph and no driver memory.
    assert watch.graphs[-1] == watch.graphs[half] and watch.driver[-1] <= watch.driver[half]
    # Without: new lengths keep compiling graphs to the end.
    assert plain.graphs[-1] > plain.graphs[half] and plain.driver[-1] - plain.driver[half] > 20 * GRAPH_ENTRY
    assert plain.driver[-1] > 2 * watch.driver[-1]
    changed = [c for c in report["changes"] if c["target"] == "data collator padding"]
    assert len(changed) == 1 and changed[0]["from"] == "to each batch's longest row"
    longest = max(len(item["input_ids"]) for item in Samples(n=96).items)
    assert report["batch"]["padding_buckets"][-1] == report["memory"]["longest_sequence"] == longest
    assert not [c for c in plain_report["changes"] if c["target"] == "data collator padding"]
    assert trainer.data_collator is collate  # the user's collator is back after train()


def test_bucketing_leaves_the_loss_unchanged(creep_runs):
    bucketed, plain = losses(creep_runs["bucketed"][0]), losses(creep_runs["unbucketed"][0])
    assert len(bucketed) == len(plain) == 48
    assert bucketed == pytest.approx(plain, rel=1e-6)


def test_every_training_log_line_and_the_report_carry_tokens_per_second(creep_runs):
    trainer, report, _ = creep_runs["bucketed"]
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(entry["throughput/tokens_per_second"] > 0 for entry in logged)
    real_tokens = sum(len(item["input_ids"]) for item in Samples(n=96).items) * 2  # 2 epochs, padding not counted
    assert report["throughput"]["tokens"] == real_tokens and report["throughput"]["tokens_per_second"] > 0


# -- the cache --------------------------------------------------------------------------------------------------------


def test_release_when_the_cache_runs_far_above_the_live_tensors():
    mib, usable = 2**20, 1000 * 2**20
    assert release_reason(100 * mib, 200 * mib, 0, usable) is None  # cache no bigger than the live tensors
    assert release_reason(100 * mib, 300 * mib, 0, usable) is None  # bigger, but a fifth of the budget: reused
    kind, why = release_reason(100 * mib, 500 * mib, 0, usable)
    assert kind == cache_policy.IDLE and "cached memory" in why
    assert release_reason(100 * mib, 500 * mib, 300 * mib, usable) is None  # the rest is not the allocator's
    assert release_reason(100 * mib, 500 * mib, 0, usable, steps_since=cache_policy.IDLE_EVERY - 1) is None
    assert release_reason(100 * mib, 500 * mib, 0, usable, steps_since=cache_policy.IDLE_EVERY)[0] == cache_policy.IDLE
    kind, why = release_reason(900 * mib, 1001 * mib, 0, usable, steps_since=0)  # over budget: at once, every time
    assert kind == cache_policy.OVER_BUDGET and "over the usable budget" in why
    assert release_reason(1, 10**12, 0, None) is None


def test_a_cache_far_above_the_live_tensors_is_released_and_said(shim, tmp_path):
    shim(limit=8 * 2**20)  # the run needs ~3 MiB: a step's freed activations are a large share of the budget
    trainer, report = train(tmp_path, dataset=Samples(n=16, lengths=(90, 96)), epochs=1)
    released = [e for e in report["events"] if e["kind"] == "cache_released"]
    assert released and "MiB given back" in released[0]["detail"]
    assert report["memory"]["cache_released_bytes"] > 0
    assert len(released) == 1  # 4 steps: an idle cache is released at most once in IDLE_EVERY steps


# -- fused AdamW ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("torch_release", "asked", "expected"),
    [("2.13", "adamw_torch", "adamw_torch_fused"), ("2.5", "adamw_torch", "adamw_torch_fused"),
     ("2.4", "adamw_torch_fused", "adamw_torch"), ("2.4", "adamw_torch", "adamw_torch"), ("2.13", "sgd", "sgd"),
     ("2.13", "adafactor", "adafactor")],
)
def test_fused_adamw_where_the_emulated_torch_runs_it_on_mps(shim, tmp_path, torch_release, asked, expected):
    shim(simulate=f"macos=14.5,torch={torch_release},memory=16GiB")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), optim=asked, report_to=[])
    assert str(getattr(args.optim, "value", args.optim)) == expected
    changed = [c["to"] for c in mps_shim.report()["changes"] if c["target"] == "TrainingArguments.optim"]
    assert changed == ([] if asked == expected else [expected])


def test_pin_memory_is_dropped_on_the_apple_gpu(shim, tmp_path):
    shim()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], dataloader_num_workers=2)
    assert args.dataloader_pin_memory is False and args.dataloader_num_workers == 2
    changed = [c for c in mps_shim.report()["changes"] if c["target"] == "TrainingArguments.dataloader_pin_memory"]
    assert len(changed) == 1 and "no pinned memory" in changed[0]["reason"]


@pytest.mark.parametrize(("torch_release", "compiled"), [("2.6", False), ("2.7", True), ("2.13", True)])
def test_torch_compile_is_turned_off_where_inductor_has_no_mps_backend(shim, tmp_path, torch_release, compiled):
    shim(simulate=f"macos=14.5,torch={torch_release},memory=16GiB")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], torch_compile=True)
    assert args.torch_compile is compiled
    changed = [c for c in mps_shim.report()["changes"] if c["target"] == "TrainingArguments.torch_compile"]
    assert len(changed) == (0 if compiled else 1)


# -- throttling -------------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_sustained_drop_warns_once_and_a_steady_or_briefly_slow_run_does_not():
    batch = {"attention_mask": torch.ones(4, 100)}
    window = throughput.WINDOW_STEPS

    def run(step_seconds):
        clock, report = FakeClock(), Report(None)
        meter = throughput.Throughput(report, clock)
        for seconds in step_seconds:
            meter.step_started(batch)
            clock.now += seconds
        meter.end()
        return [e for e in report.data["events"] if e["kind"] == "throughput_drop"], meter

    drops, meter = run([1.0] * 3 * window + [3.0] * 6 * window)
    assert len(drops) == 1 and "fell to 133, 33% of this run's best 400" in drops[0]["detail"]
    assert meter.summary()["tokens"] == 9 * window * 400
    assert run([1.0] * 9 * window)[0] == []
    assert run([1.0] * 3 * window + [3.0] * 2 * window + [1.0] * 4 * window)[0] == []  # not sustained
    assert run([5.0] * window + [1.0] * 8 * window)[0] == []  # a slow warm-up is not the run's best


def test_throttling_during_a_real_training_run_is_a_report_event(shim, tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(throughput, "WINDOW_STEPS", 3)

    class SlowsDown(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # before the step's log line
            clock.now += 1.0 if state.global_step <= 9 else 4.0  # each step's time, as the meter sees it

    monkeypatch.setattr(throughput, "CLOCK", clock)
    shim()
    trainer, report = train(tmp_path, dataset=Samples(n=21, lengths=(16, 16)), per_device=1, epochs=1,
                            callbacks=[SlowsDown()])
    drops = [e for e in report["events"] if e["kind"] == "throughput_drop"]
    assert len(drops) == 1 and drops[0]["step"] == 18 and "throttling" in drops[0]["detail"]
    logged = [entry["throughput/tokens_per_second"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 21 and logged[:9] == [16.0] * 9 and logged[9:] == [4.0] * 12
