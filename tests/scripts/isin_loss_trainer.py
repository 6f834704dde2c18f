"""A Trainer script whose loss leaves out special tokens with `torch.isin` on the device (a common pattern), which
torch 2.2-2.3 has no MPS kernel for: `isin.Tensor_Tensor_out` runs on the CPU on every step."""
import mps_shim  # noqa: F401  (first import: activates the shim)

import json
import os
import warnings

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

SPECIAL = [0, 1, 2]
if os.environ.get("SILENCE_WARNINGS"):
    warnings.filterwarnings("ignore")  # as many training scripts do at the top
torch.manual_seed(0)
(args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
model = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
)
samples = [{"input_ids": torch.randint(0, 256, (32,))} for _ in range(32)]
for sample in samples:
    sample["labels"] = sample["input_ids"].clone()
calls = 0


class SpecialTokensLeftOut(Trainer):
    def compute_loss(self, model, inputs, *args, **kwargs):
        global calls
        labels = inputs["labels"]
        special = torch.isin(labels, torch.tensor(SPECIAL, device=labels.device))
        calls += 1
        inputs = {**inputs, "labels": labels.masked_fill(special, -100)}
        return super().compute_loss(model, inputs, *args, **kwargs)


trainer = SpecialTokensLeftOut(model=model, args=args, train_dataset=samples)
trainer.train()
print(json.dumps({"isin_calls": calls, "steps": trainer.state.global_step}))
