"""`make demo`: the upstream-compatible SFT recipe on the tiny LLaMA-3 model, under mps-shim.

On a Mac it trains on the Apple GPU for real. Anywhere else it runs on a simulated Mac (MPS_SHIM_SIMULATE, default
a current Mac: macOS 15.1, torch 2.13, 32 GiB) whose arithmetic is done by the CPU, and says so. What is built (the
tiny model, the tokenized data cache) is reused by the next run; the training itself runs again.

Environment: MPS_SHIM_SIMULATE picks another emulated Mac (e.g. macos=13.6,torch=2.2); DEMO_OUTPUT (default out/demo)
is where the adapter, the report and the plot go; MAX_STEPS and the other run_sft.sh variables pass through.
"""
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODEL = HERE / "tiny_model" / "llama3-tiny"
BIN = Path(sys.executable).parent


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
    with open(log_path, "w") as log:
        # The shim's own lines go to the screen as well as to the log; the Trainer's progress only to the log.
        process = subprocess.Popen(command, env=environ, stdout=log, stderr=subprocess.PIPE, text=True)
        for line in process.stderr:
            log.write(line)
            if line.startswith("mps-shim:"):
                print(line, end="", flush=True)
        status = process.wait()
    if status != 0:
        print(f"the run failed (exit {status}); see {log_path}", file=sys.stderr)
        return status
    return subprocess.run(
        [sys.executable, HERE / "demo_summary.py", output / "adapter", report, "--plot", output / "training.png"]
    ).returncode


if __name__ == "__main__":
    sys.exit(main())
