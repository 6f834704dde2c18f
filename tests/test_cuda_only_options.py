"""QLoRA and flash-attention switches of the example (upstream's `--load_in_kbits 4`, `--use_flash_attention_2`),
through the script form of the prefix: `mps-shim run_clm_sft_with_peft.py ...`. bitsandbytes is not installed in any
test stack, as on most Macs: the model is loaded unquantized in the plan's dtype, and peft's kbit preparation no
longer casts every weight to fp32."""
import math

from conftest import EXAMPLE_SFT_DIR
from support import MPS_SHIM, clean_env, read_json, run


def test_qlora_and_flash_attention_become_what_the_mac_runs(tmp_path, tiny_model_dir, sample_data_copy):
    dataset_dir, validation_file = sample_data_copy
    report = tmp_path / "report.json"
    arguments = [
        "--model_name_or_path", tiny_model_dir, "--tokenizer_name_or_path", tiny_model_dir,
        "--dataset_dir", dataset_dir, "--validation_file", validation_file, "--output_dir", tmp_path / "out",
        "--do_train", "--max_steps", "3", "--per_device_train_batch_size", "2", "--max_seq_length", "128",
        "--bf16", "--torch_dtype", "bfloat16", "--load_in_kbits", "4", "--use_flash_attention_2", "True",
        "--low_cpu_mem_usage", "--lora_rank", "4", "--trainable", "q_proj,v_proj", "--logging_steps", "1",
        "--report_to", "none", "--save_strategy", "no", "--seed", "1",
    ]
    result = run([MPS_SHIM, EXAMPLE_SFT_DIR / "run_clm_sft_with_peft.py", *arguments],
                 env=clean_env(MPS_SHIM_SIMULATE="macos=15.1,torch=2.13,memory=16GiB", MPS_SHIM_REPORT=str(report)))
    assert result.returncode == 0, result.stderr[-3000:]
    changes = {change["target"]: change for change in read_json(report)["changes"]}
    assert changes["from_pretrained(attn_implementation=)"]["to"] == "sdpa"
    assert changes["from_pretrained(quantization_config=)"]["to"] is None
    assert "bitsandbytes does not run on this Mac" in changes["from_pretrained(quantization_config=)"]["reason"]
    assert changes["prepare_model_for_kbit_training"]["to"] == "freeze only"
    # the frozen base stayed bf16 (the plan's dtype), not the fp32 kbit preparation would have made of it
    assert "from_pretrained(torch_dtype=)" not in changes
    losses = [float(line.split("'loss': ")[1].split(",")[0].strip("'")) for line in result.stdout.splitlines()
              if "'loss': " in line]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
