"""`make demo`: the upstream-compatible SFT recipe on the tiny LLaMA-3 model, under mps-shim.

On a Mac it trains on the Apple GPU for real. Anywhere else it runs on a simulated Mac (MPS_SHIM_SIMULATE, default
a current Mac: macOS 15.1, torch 2.13, 32 GiB) whose arithmetic is done by the CPU, and says so. What is built (the
tiny model, the tokenized data cache) is reused by the next run; the training itself runs again.

Environment: MPS_SHIM_SIMULATE picks another emulated Mac (e.g. macos=13.6,torch=2.2); DEMO_OUTPUT (default out/demo)
is where the adapter, the report and the plot go; MAX_STEPS and the other run_sft.sh variables pass through.
"""
import ast
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODEL = HERE / "tiny_model" / "llama3-tiny"
BIN = Path(sys.executable).parent
# The Trainer's progress bar ("12/40 [00:05<00:15, ...]") and its log line per logging step ("{'loss': 2.1, ...}").
BAR = re.compile(r"(\d+)/(\d+) \[")


class Progress:
    """Which lines of the run the screen shows: the shim's, and one per logging step (all of them go to the log)."""

    def __init__(self):
        self.step = None

    def screen_line(self, line: str) -> str | None:
        line = line.rstrip("\n")
        if line.startswith("mps-shim:"):
            return line
        bar = BAR.search(line)
        if bar:
            self.step = f"{bar.group(1)}/{bar.group(2)}"
            return None
        logs = _logs(line)
        if logs is None:
            return None
        # transformers 5 prints the values as text ('8.055'), 4.x as numbers
        if "loss" in logs:
            return f"  step {self.step or '?'}: loss {float(logs['loss']):.4f}"
        if "eval_loss" in logs:
            return f"  evaluation: loss {float(logs['eval_loss']):.4f}"
        if "train_runtime" in logs:
            return f"  trained in {float(logs['train_runtime']):.0f} s"
        return None


def _logs(line: str) -> dict | None:
    """The Trainer's log dict printed on a line, or None."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        logs = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    return logs if isinstance(logs, dict) else None


def main() -> int:
    output = Path(os.environ.get("DEMO_OUTPUT", REPO / "out" / "demo")).resolve()
    report = output / "report.json"
    environ = dict(os.environ, OUTPUT_DIR=str(output / "adapter"), MPS_SHIM_REPORT=str(report))
    environ.setdefault("HF_HUB_OFFLINE", "1")
    environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if not (MODEL / "config.json").exists():
        print(f"building the tiny LLaMA-3 model in {MODEL.relative_to(REPO)} ...", flush=True)
        subprocess.run([sys.executable, HERE / "tiny_model" / "build_tiny_model.py", "--output", MODEL], check=True)
    environ["PRETRAINED_MODEL"] = str(MODEL)

    on_a_mac = sys.platform == "darwin" and platform.machine() == "arm64"
    if not on_a_mac and not environ.get("MPS_SHIM_SIMULATE"):
        environ["MPS_SHIM_SIMULATE"] = "1"
    if environ.get("MPS_SHIM_SIMULATE"):
        print(
            f"No Apple GPU here: running on a SIMULATED Mac (MPS_SHIM_SIMULATE={environ['MPS_SHIM_SIMULATE']}); "
            "the CPU does the arithmetic, the emulated Mac decides precision, memory and refusals.",
            flush=True,
        )

    output.mkdir(parents=True, exist_ok=True)
    command = [BIN / "mps-shim", "bash", HERE / "sft" / "run_sft.sh"]
    print("$ mps-shim bash examples/sft/run_sft.sh", flush=True)
    log_path = output / "train.log"
    print(f"the full output goes to {log_path.relative_to(REPO) if log_path.is_relative_to(REPO) else log_path}",
          flush=True)
    environ["PYTHONUNBUFFERED"] = "1"  # the Trainer's log lines as they happen, not when a pipe buffer fills
    progress = Progress()
    with open(log_path, "w") as log:
        # Everything goes to the log; the screen gets the shim's lines and a line per logging step. Text mode reads the
        # progress bar's carriage returns as line ends, so each update of the bar is a line here.
        process = subprocess.Popen(command, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            log.write(line)
            shown = progress.screen_line(line)
            if shown is not None:
                print(shown, flush=True)
        status = process.wait()
    if status != 0:
        print(f"the run failed (exit {status}); see {log_path}", file=sys.stderr)
        return status
    return subprocess.run(
        [sys.executable, HERE / "demo_summary.py", output / "adapter", report, "--plot", output / "training.png"]
    ).returncode


if __name__ == "__main__":
    sys.exit(main())
