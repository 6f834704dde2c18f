"""A long mixed-length run on the simulated Apple GPU, with and without the shim's padding buckets, side by side.

    .venv/current/bin/python benchmarks/long_runs.py [--steps 120] [--json PATH] [--plot out/long_runs.png]

The simulated Mac charges 55 KB of driver memory per new op signature, as MPS's graph cache does
(docs/mps-facts.md, "Long runs"). Printed per variant: the driver's total after the first and the last step and its
growth over the second half of the run (the creep), the graph-cache entries, the median step time and the tokens per
second (real tokens, padding not counted). Step times are the CPU's: they show what the extra padding costs in
arithmetic, not what a Mac saves by compiling fewer graphs (the simulator models memory, not time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

SIMULATE = "macos=15.1,torch=2.13,memory=16GiB"
GRAPH_ENTRY = 55_000
VOCAB = 2048

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402

import mps_shim  # noqa: E402
import mps_shim.runtime  # noqa: E402
from mps_shim import shapes  # noqa: E402

mps_shim.deactivate()
transformers.logging.set_verbosity_error()


class Samples(torch.utils.data.Dataset):
    def __init__(self, n, lengths, seed=1):
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
    length = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    labels = torch.full((len(items), length), -100)
    mask = torch.zeros(len(items), length, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = item["input_ids"], item["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def model(hidden=128, layers=2):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=2048,
    )
    config._attn_implementation = "sdpa"
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], modules_to_save=["lm_head"])
    return peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)


class Watch(transformers.TrainerCallback):
    def __init__(self):
        self.driver, self.graphs, self.times = [], [], []
        self._start = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)
        memory = mps_shim.runtime.current().simulator.memory
        self.driver.append(memory.driver_bytes())
        self.graphs.append(memory.graph_entries)


def one_run(buckets, steps, dataset):
    original = shapes.MAX_BUCKETS
    shapes.MAX_BUCKETS = buckets
    mps_shim.deactivate()
    mps_shim.activate(simulate=f"{SIMULATE},graph_entry={GRAPH_ENTRY}", precision="fp32", log_level="quiet")
    watch = Watch()
    try:
        with tempfile.TemporaryDirectory() as output:
            args = transformers.TrainingArguments(
                output_dir=output, per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-3,
                logging_steps=10, save_strategy="no", report_to=[], seed=0, disable_tqdm=True,
            )
            trainer = transformers.Trainer(model=model(), args=args, train_dataset=dataset, data_collator=collate,
                                           callbacks=[watch])
            trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # the table below says it all
            trainer.train()
        report = mps_shim.report()
    finally:
        shapes.MAX_BUCKETS = original
        mps_shim.deactivate()
    half = len(watch.driver) // 2
    mib = 2**20
    return {
        "driver_first_mib": watch.driver[0] / mib,
        "driver_last_mib": watch.driver[-1] / mib,
        "second_half_growth_mib": (watch.driver[-1] - watch.driver[half]) / mib,
        "graph_entries": watch.graphs[-1],
        "median_step_seconds": statistics.median(watch.times[2:]),
        "tokens_per_second": report.get("throughput", {}).get("tokens_per_second"),
        "buckets": report.get("batch", {}).get("padding_buckets"),
        "driver_mib_per_step": [d / mib for d in watch.driver],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, default=Path(__file__).resolve().parent.parent / "out" / "long_runs.png")
    options = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    dataset = Samples(options.steps * 4, (16, 256))
    results = {"bucketed": one_run(shapes.MAX_BUCKETS, options.steps, dataset),
               "unbucketed": one_run(0, options.steps, dataset)}
    b, u = results["bucketed"], results["unbucketed"]
    print(f"{options.steps} steps of 4 sequences of 16-256 tokens, graph entries at {GRAPH_ENTRY // 1000} KB "
          f"(buckets: {b['buckets']})")
    print("| measurement | with buckets | without | ratio |")
    print("|---|---|---|---|")
    rows = (
        ("driver memory after step 1 (MiB)", "driver_first_mib", "{:.1f}"),
        ("driver memory after the last step (MiB)", "driver_last_mib", "{:.1f}"),
        ("driver growth over the second half (MiB)", "second_half_growth_mib", "{:.1f}"),
        ("MPS graph-cache entries", "graph_entries", "{}"),
        ("median step time (s, CPU arithmetic)", "median_step_seconds", "{:.3f}"),
        ("tokens per second (real tokens)", "tokens_per_second", "{:.0f}"),
    )
    for label, key, form in rows:
        ratio = b[key] / u[key] if u[key] else float("nan")
        print(f"| {label} | {form.format(b[key])} | {form.format(u[key])} | {ratio:.2f} |")
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    options.plot.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        axis.plot(range(1, len(result["driver_mib_per_step"]) + 1), result["driver_mib_per_step"], label=name)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("simulated driver memory (MiB)")
    axis.set_title("Mixed-length run on the simulated Mac: MPS graph cache")
    axis.legend()
    figure.tight_layout()
    figure.savefig(options.plot)
    print(f"plot: {options.plot}")


if __name__ == "__main__":
    sys.exit(main())
