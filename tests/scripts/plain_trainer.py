"""A training script of the kind Hugging Face's examples teach, nothing from our example: `import mps_shim` first,
a LLaMA built from a config, a Trainer with `--bf16`/`--fp16` taken from the command line.

INJECT_NON_FINITE=N makes the first N training forwards return a NaN loss (as an fp16 overflow would).
"""
import mps_shim  # noqa: F401  (first import: activates the shim)

import json
import os
import sys

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

torch.manual_seed(0)
(args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
model = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
)
samples = [{"input_ids": torch.randint(0, 256, (32,)), "labels": None} for _ in range(64)]
for sample in samples:
    sample["labels"] = sample["input_ids"].clone()

remaining = int(os.environ.get("INJECT_NON_FINITE", "0"))


def poison(module, inputs, output):
    global remaining
    if module.training and remaining > 0:
        remaining -= 1
        output.logits = output.logits * float("nan")
        output.loss = output.loss * float("nan")
    return output


model.register_forward_hook(poison)
trainer = Trainer(model=model, args=args, train_dataset=samples)
trainer.train()
trainer.save_model()
finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
print(json.dumps({"finite": finite, "steps": trainer.state.global_step}))
sys.exit(0)
