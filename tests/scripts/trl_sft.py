"""TRL's SFTTrainer on the tiny model and our sample data, as a TRL user would write it: `--bf16` and a LoRA config.
Nothing in it knows about mps-shim; it is started with the prefix or MPS_SHIM=1."""
import json
import sys

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

model_dir, data_file, output_dir = sys.argv[1:4]
records = json.loads(open(data_file, encoding="utf-8").read())[:32]
dataset = Dataset.from_list([{"text": r["instruction"] + "\n" + r["output"]} for r in records])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16, device_map={"": 0})
config = SFTConfig(
    output_dir=output_dir, bf16=True, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
    logging_steps=1, report_to="none", save_strategy="no", max_length=128,
)
trainer = SFTTrainer(
    model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
    peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
)
trainer.train()
losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
# LoRA's B matrices start at zero: any applied optimizer step moves them.
lora_b = max(float(p.abs().max()) for name, p in trainer.model.named_parameters() if "lora_B" in name)
print(json.dumps({"losses": losses, "lora_b_max": lora_b}))
