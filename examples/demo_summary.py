"""Summarise a demo run: what the shim changed, the precision and batch it chose, how the loss moved.

    python examples/demo_summary.py OUTPUT_DIR REPORT_JSON [--plot PNG]

OUTPUT_DIR is the --output_dir of run_sft.sh (it holds trainer_state.json and the adapter);
REPORT_JSON is the file named by MPS_SHIM_REPORT. Missing parts (no report yet, no memory
figures in the log) are reported as missing rather than failing. The plot shows the training loss
per step and, when the log has them, the memory allocated against the shim's budget.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files only; no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402

ALLOCATED_KEY = "memory/allocated_mib"
DRIVER_KEY = "memory/driver_mib"
BUDGET_KEY = "memory/budget_mib"


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def describe_report(report):
    if report is None:
        return ["shim report: not found"]
    lines = ["changes made by the shim:"]
    changes = report.get("changes") or []
    lines += [f"  {c.get('target')}: {c.get('from')!r} -> {c.get('to')!r} ({c.get('reason')})" for c in changes]
    if not changes:
        lines.append("  none")
    precision = (report.get("precision") or {}).get("chosen", "unknown")
    lines.append(f"precision chosen: {precision}")
    batch = report.get("batch")
    if batch:
        lines.append(
            f"batch: micro-batch {batch.get('micro_batch')} x gradient accumulation "
            f"{batch.get('gradient_accumulation_steps')} = effective {batch.get('effective_batch')} "
            f"(asked: per_device_train_batch_size {batch.get('per_device_train_batch_size')})")
    return lines


def training_entries(trainer_state):
    """Log entries of training steps (eval and summary entries have no 'loss')."""
    return [entry for entry in (trainer_state or {}).get("log_history", []) if "loss" in entry]


def describe_training(entries, output_dir, report_path):
    lines = []
    if entries:
        lines.append(f"training loss: {entries[0]['loss']:.3f} (step {entries[0]['step']}) -> "
                     f"{entries[-1]['loss']:.3f} (step {entries[-1]['step']})")
    else:
        lines.append(f"training loss: no trainer_state.json log in {output_dir}")
    adapter = output_dir / "adapter_model.safetensors"
    lines.append(f"adapter: {adapter if adapter.is_file() else 'not found in ' + str(output_dir)}")
    lines.append(f"report: {report_path}")
    return lines


def plot(entries, plot_path):
    steps = [entry["step"] for entry in entries]
    memory_entries = [entry for entry in entries if ALLOCATED_KEY in entry]
    rows = 2 if memory_entries else 1
    figure, axes = plt.subplots(rows, 1, figsize=(8, 3.2 * rows), sharex=True, squeeze=False)
    loss_axis = axes[0][0]
    loss_axis.plot(steps, [entry["loss"] for entry in entries], marker=".", color="tab:blue")
    loss_axis.set_ylabel("training loss")
    loss_axis.set_title("Tiny Llama-3 LoRA SFT demo")
    loss_axis.grid(alpha=0.3)
    if memory_entries:
        memory_axis = axes[1][0]
        memory_steps = [entry["step"] for entry in memory_entries]
        memory_axis.plot(memory_steps, [entry[ALLOCATED_KEY] for entry in memory_entries],
                         marker=".", color="tab:green", label="allocated by tensors")
        driver = [(entry["step"], entry[DRIVER_KEY]) for entry in memory_entries if DRIVER_KEY in entry]
        if driver:
            memory_axis.plot(*zip(*driver), color="tab:orange", label="held by the allocator")
        budget = [(entry["step"], entry[BUDGET_KEY]) for entry in memory_entries if BUDGET_KEY in entry]
        if budget:
            memory_axis.plot(*zip(*budget), linestyle="--", color="tab:red", label="shim budget")
        # A log scale: a small model's few MiB and a Mac's budget of many GiB both stay readable.
        memory_axis.set_yscale("log")
        memory_axis.set_ylabel("memory (MiB, log scale)")
        memory_axis.legend(loc="best")
        memory_axis.grid(alpha=0.3)
    axes[-1][0].set_xlabel("optimizer step")
    figure.tight_layout()
    figure.savefig(plot_path, dpi=100)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description="Summarise an mps-shim demo run.")
    parser.add_argument("output_dir", type=Path, help="the run's --output_dir")
    parser.add_argument("report", type=Path, help="the mps-shim report (MPS_SHIM_REPORT)")
    parser.add_argument("--plot", type=Path, help="PNG to write (default: OUTPUT_DIR/training_summary.png)")
    args = parser.parse_args()

    entries = training_entries(read_json(args.output_dir / "trainer_state.json"))
    lines = describe_report(read_json(args.report)) + describe_training(entries, args.output_dir, args.report)
    if entries:
        plot_path = args.plot or args.output_dir / "training_summary.png"
        plot(entries, plot_path)
        lines.append(f"plot: {plot_path}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
