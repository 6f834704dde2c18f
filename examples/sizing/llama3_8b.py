"""Will upstream's Llama-3-8B LoRA recipe fit on a Mac? The README's table, made without downloading the weights.

    python examples/sizing/llama3_8b.py                  # prints the README block (Markdown)
    python examples/sizing/llama3_8b.py --write-readme   # writes it into README.md between its markers

Llama-3-8B's published config is written to a temporary folder with no weight file. Under `mps-shim plan` (in this
process: MPS_SHIM_PLAN_ONLY=1, as the command sets it) from_pretrained builds it on the meta device
(patches/modeling.py), and a Trainer with the values of upstream's scripts/training/run_sft.sh reaches train(), where
the preflight calibrates on small real-weight twins and shim/sizing.py sizes it for each Mac: the code `mps-shim plan
--mac-sizes ...` runs, on a simulated Mac with macOS 15.1 and torch 2.13. Offline, in seconds.

The same for a full fine-tuning of the model, set beside accelerate's `estimate_training_usage` (`accelerate estimate-
memory`'s "Training using Adam") for the same model and precision.
"""
import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN = "<!-- sizing: made by examples/sizing/llama3_8b.py --write-readme -->"
END = "<!-- end of sizing -->"

MAC_SIZES = "8GB,16GB,24GB,32GB,36GB,48GB,64GB,96GB,128GB"
# The Mac the plans run on: its size only decides the preflight's own split; 512 GB so that even a full fine-tuning
# is estimated without gradient checkpointing, as accelerate's figure is.
PROFILE = "macos=15.1,torch=2.13,memory=512GiB"

# meta-llama/Meta-Llama-3-8B's config.json
LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16",
)
# upstream's scripts/training/run_sft.sh (examples/sft/run_sft.sh has the same flags, scaled down)
LORA = dict(
    r=64, lora_alpha=128, lora_dropout=0.05,
    target_modules=["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
)
MODULES_TO_SAVE = ["embed_tokens", "lm_head"]
PER_DEVICE, ACCUMULATION, MAX_SEQ_LENGTH = 1, 8, 512


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "peft", "accelerate"))


def plan(folder: str, output: str, lora: bool, modules_to_save, sizes: str = MAC_SIZES, accumulation=ACCUMULATION):
    """`mps-shim plan --mac-sizes SIZES` of the recipe, in this process; the report."""
    import mps_shim
    import peft
    import torch
    import transformers
    from mps_shim.errors import MemoryPlanError, PlanReached

    os.environ["MPS_SHIM_PLAN_SIZES"] = sizes
    mps_shim.deactivate()
    mps_shim.activate()  # a fresh run, with the options of the environment
    # In upstream's order: the training arguments (--bf16) are parsed before the model loads (--torch_dtype).
    args = transformers.TrainingArguments(
        output_dir=output, per_device_train_batch_size=PER_DEVICE, per_device_eval_batch_size=PER_DEVICE,
        gradient_accumulation_steps=accumulation, bf16=True, report_to=[], save_strategy="no",
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16, device_map={"": 0})
    model.config.use_cache = False
    if lora:
        config = peft.LoraConfig(task_type="CAUSAL_LM", modules_to_save=modules_to_save, **LORA)
        model = peft.get_peft_model(model, config)
    sample = {"input_ids": [1] * MAX_SEQ_LENGTH, "attention_mask": [1] * MAX_SEQ_LENGTH, "labels": [1] * MAX_SEQ_LENGTH}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[sample], eval_dataset=[sample])
    with contextlib.redirect_stdout(sys.stderr):  # the plan as `mps-shim plan` prints it
        try:
            trainer.train()
        except (PlanReached, MemoryPlanError):
            pass
    return mps_shim.report()


def accelerate_figure(config) -> tuple[int, dict]:
    """What `accelerate estimate-memory` says for training in bf16 with Adam: its empty model (fp32, as it creates
    it), calculate_maximum_sizes, estimate_training_usage, and the largest part, which is the figure it prints."""
    import transformers
    from accelerate import init_empty_weights
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes

    with init_empty_weights(include_buffers=True):
        model = transformers.AutoModelForCausalLM.from_config(config)
    total, _ = calculate_maximum_sizes(model.float())
    parts = estimate_training_usage(total, "bfloat16")
    return max(parts.values()), parts


def gib(size) -> str:
    return f"{size / 2**30:.1f} GiB"


def markdown(report: dict) -> list[str]:
    lines = [
        "| Mac | budget | fits | micro-batch | gradient checkpointing | frozen weights | estimated peak | to fit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["sizing"]["rows"]:
        lines.append(
            f"| {row['memory_bytes'] // 2**30} GB | {gib(row['budget_bytes'])} | {'yes' if row['fits'] else 'no'} | "
            f"{row['micro_batch'] or '-'} | {'yes' if row['gradient_checkpointing'] else 'no'} | "
            f"{row['frozen_weights_dtype']} | {gib(row['estimated_peak_bytes'])} | "
            f"{' or '.join(row['to_fit']) or ('-' if row['fits'] else 'a larger Mac')} |"
        )
    return lines


def block() -> str:
    os.environ.update(
        MPS_SHIM_SIMULATE=PROFILE, MPS_SHIM_PLAN_ONLY="1", MPS_SHIM_LOG_LEVEL="quiet",
        HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
    )
    os.environ.pop("MPS_SHIM_MEMORY_LIMIT", None)
    os.environ.pop("MPS_SHIM_REPORT", None)
    import mps_shim  # noqa: F401  first: the shim is active before torch loads
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        config = transformers.LlamaConfig(**LLAMA3_8B)
        config.save_pretrained(folder)  # config.json only: no weights
        written = plan(folder, os.path.join(folder, "out"), True, MODULES_TO_SAVE)
        lighter = plan(folder, os.path.join(folder, "out"), True, None)
        # accelerate's figure is for one step of batch 1: no accumulation; no table, one Mac where it fits
        full = plan(folder, os.path.join(folder, "out"), False, None, sizes="512GB", accumulation=1)
        theirs, their_parts = accelerate_figure(config)
    sizing, memory = written["sizing"], full["memory"]
    parts = memory["estimate_parts"]
    shown = ", ".join(f"{name.replace('_', ' ')} {gib(value)}" for name, value in parts.items())
    lines = [
        f"Upstream's recipe as written: Llama-3-8B, LoRA rank {LORA['r']} on the seven projections, "
        f"`--modules_to_save {','.join(MODULES_TO_SAVE)}`, per-device batch {PER_DEVICE} x accumulation "
        f"{ACCUMULATION}, sequences of {MAX_SEQ_LENGTH} tokens, `--bf16 --torch_dtype bfloat16`; macOS {sizing['macos']}, "
        f"torch {sizing['torch']} ({sizing['precision']} autocast); estimates scaled from two small real-weight twins ({written['memory']['estimate_scaled']}).",
        "",
        *markdown(written),
        "",
        "The same without `--modules_to_save`:",
        "",
        *markdown(lighter),
        "",
        f"Full fine-tuning of the same model, bf16 autocast, AdamW, one step of batch {PER_DEVICE} x "
        f"{MAX_SEQ_LENGTH} tokens: mps-shim estimates a peak of {gib(memory['estimated_peak_bytes'])} at the "
        f"{memory['estimate_phase'].replace('_', ' ')} ({shown}, all resident together). accelerate's "
        f"`estimate_training_usage` gives {gib(theirs)}: model "
        f"{gib(their_parts['model'])}, gradients {gib(their_parts['gradients'])}, optimizer "
        f"{gib(their_parts['optimizer'])}, step {gib(their_parts['step'])}, and its figure is the largest of these.",
        "",
        f"Made with {versions()}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-readme", action="store_true", help="write the block into README.md")
    write = parser.parse_args().write_readme
    text = block()
    if write:
        readme = README.read_text()
        start, stop = readme.index(BEGIN) + len(BEGIN), readme.index(END)
        README.write_text(readme[:start] + "\n" + text + "\n" + readme[stop:])
    print(text)


if __name__ == "__main__":
    main()
