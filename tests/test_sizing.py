"""Will it fit on my Mac, before the download: `mps-shim plan` of a model folder without weights, and the table of Mac
sizes (shim/sizing.py, the meta-device path of patches/modeling.py, examples/sizing/llama3_8b.py).

Real libraries and real models throughout: the tiny example model, a model wider than the twins the preflight
measures in place of a model without weights, and Llama-3-8B's config on the meta device.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time

import pytest

import mps_shim
from mps_shim.capabilities import recommended_working_set
from mps_shim.errors import MemoryPlanError, PlanReached, ShimConfigError
from mps_shim.estimate import ModelFacts, model_facts
from mps_shim.plan import PrecisionPlan
from mps_shim.sizing import LoraFacts, Shape, parse_mac_sizes, size_row

from support import MPS_SHIM, REPO, clean_env, read_json, run

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

sys.path.insert(0, str(REPO / "examples" / "sizing"))
import llama3_8b  # noqa: E402  (the README script: Llama-3-8B's config and upstream's recipe)

GIB = 2**30
SIMULATE = "macos=15.1,torch=2.13,memory=16GiB"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def config_only_copy(model_dir, folder):
    """A copy of a model folder with only its config and tokenizer: what one downloads to ask before the weights."""
    folder.mkdir()
    for name in ("config.json", *TOKENIZER_FILES):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, folder / name)
    return folder


def plan_command(model, data, tmp_path, name, sizes="8GB,16GB"):
    """`mps-shim plan --mac-sizes SIZES bash run_sft.sh` on the example's data; (result, report)."""
    dataset_dir, validation_file = data
    report = tmp_path / f"{name}.json"
    environment = clean_env(
        PRETRAINED_MODEL=str(model), DATASET_DIR=str(dataset_dir), VALIDATION_FILE=str(validation_file),
        OUTPUT_DIR=str(tmp_path / f"out-{name}"), PREPROCESSING_NUM_WORKERS="1",
    )
    result = run(
        [MPS_SHIM, "--simulate", SIMULATE, "--report", report, "--log-level", "quiet", "plan", "--mac-sizes", sizes,
         "sh", REPO / "examples" / "sft" / "run_sft.sh"],
        env=environment, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, read_json(report)


def test_a_folder_with_only_config_and_tokenizer_is_planned_within_5_percent_of_the_real_model(
    tiny_model_dir, sample_data_copy, tmp_path
):
    config_only = config_only_copy(tiny_model_dir, tmp_path / "llama3-tiny-config")
    real_result, real = plan_command(tiny_model_dir, sample_data_copy, tmp_path, "real")
    result, planned = plan_command(config_only, sample_data_copy, tmp_path, "config-only")

    changed = {change["target"]: change for change in planned["changes"]}
    assert "meta device" in changed["from_pretrained(weights)"]["to"]
    assert "from_pretrained(weights)" not in {change["target"] for change in real["changes"]}
    estimated, reference = planned["memory"]["estimated_peak_bytes"], real["memory"]["estimated_peak_bytes"]
    assert estimated and reference and abs(estimated - reference) <= 0.05 * reference, (estimated, reference)
    # The plan and the report say the estimate was scaled from twins, and the real model's was not.
    assert "twins" in planned["memory"]["estimate_scaled"] and planned["sizing"]["scaled"] is True
    assert "twins" in result.stdout and "twins" not in real_result.stdout
    assert planned["sizing"]["rows"][0]["estimated_peak_bytes"] == estimated  # the 16 GiB run's own decision
    assert sorted(path.name for path in config_only.iterdir()) == sorted(
        name for name in ("config.json", *TOKENIZER_FILES) if (tiny_model_dir / name).exists()
    )


def in_process_plan(folder, tmp_path, monkeypatch, seq=256, per_device=2, modules_to_save=("embed_tokens", "lm_head")):
    """`mps-shim plan` of a LoRA run of the model in `folder`, in this process; the report."""
    monkeypatch.setenv("MPS_SHIM_PLAN_ONLY", "1")
    monkeypatch.delenv("MPS_SHIM_PLAN_SIZES", raising=False)
    mps_shim.deactivate()
    mps_shim.activate(simulate="macos=15.1,torch=2.13,memory=64GiB", log_level="quiet")
    try:
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"), per_device_train_batch_size=per_device, gradient_accumulation_steps=2,
            bf16=True, report_to=[], save_strategy="no",
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16, device_map={"": 0})
        model = peft.get_peft_model(model, peft.LoraConfig(
            task_type="CAUSAL_LM", r=8, lora_dropout=0.05, target_modules=llama3_8b.LORA["target_modules"],
            modules_to_save=list(modules_to_save) or None,
        ))
        sample = {"input_ids": [1] * seq, "attention_mask": [1] * seq, "labels": [1] * seq}
        trainer = transformers.Trainer(model=model, args=args, train_dataset=[sample] * 4)
        with contextlib.redirect_stdout(sys.stderr), pytest.raises((PlanReached, MemoryPlanError)):
            trainer.train()
        return mps_shim.report()
    finally:
        mps_shim.deactivate()


def test_a_model_wider_than_its_twins_is_estimated_within_5_percent_of_the_real_one(tmp_path, monkeypatch):
    """Hidden 1024 with 8 heads: the twins are half as wide (and have 1 and 2 of its 3 layers), so this is the
    carry-over of shim/sizing.py at work, not only its extrapolation over the layers."""
    config = transformers.LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=8192, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "real")
    config_only = config_only_copy(tmp_path / "real", tmp_path / "config-only")
    real = in_process_plan(tmp_path / "real", tmp_path, monkeypatch)
    planned = in_process_plan(config_only, tmp_path, monkeypatch)
    assert "widths 1/2 (hidden 512)" in planned["memory"]["estimate_scaled"]
    estimated, reference = planned["memory"]["estimated_peak_bytes"], real["memory"]["estimated_peak_bytes"]
    assert abs(estimated - reference) <= 0.05 * reference, (estimated, reference)
    for batch, points in real["memory"]["calibration_points"].items():  # the carried measurements themselves
        assert abs(planned["memory"]["calibration_points"][batch] - points) <= 0.1 * points


def llama3_8b_folder(folder):
    folder.mkdir()
    transformers.LlamaConfig(**llama3_8b.LLAMA3_8B).save_pretrained(folder)
    return folder


def test_llama3_8b_on_the_meta_device_weighs_what_accelerate_counts(tmp_path, monkeypatch):
    from accelerate.utils import calculate_maximum_sizes

    folder = llama3_8b_folder(tmp_path / "llama3-8b")
    monkeypatch.setenv("MPS_SHIM_PLAN_ONLY", "1")
    mps_shim.deactivate()
    mps_shim.activate(simulate="macos=15.1,torch=2.13,memory=16GiB", log_level="quiet")
    try:
        transformers.TrainingArguments(output_dir=str(tmp_path / "out"), bf16=True, report_to=[])
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16, device_map={"": 0})
        assert all(parameter.is_meta for parameter in model.parameters())
        facts = model_facts(model)
        assert facts.weight_bytes == calculate_maximum_sizes(model)[0]
        # Llama-3-8B has 8,030,261,248 parameters, here in bf16; RoPE's frequencies stay fp32, as from_pretrained has
        # them (transformers 4.40 also keeps cos/sin caches in the default dtype as buffers)
        buffers = sum(buffer.numel() * buffer.element_size() for buffer in model.buffers())
        assert facts.weight_bytes == 2 * 8_030_261_248 + buffers
        assert {b.dtype for name, b in model.named_buffers() if name.endswith("inv_freq")} == {torch.float32}
        wrapped = peft.get_peft_model(model, peft.LoraConfig(
            task_type="CAUSAL_LM", r=64, target_modules=llama3_8b.LORA["target_modules"],
            modules_to_save=llama3_8b.MODULES_TO_SAVE,
        ))
        assert model_facts(wrapped).weight_bytes == calculate_maximum_sizes(wrapped)[0]
    finally:
        mps_shim.deactivate()
    assert not [path for path in folder.iterdir() if path.suffix in (".safetensors", ".bin")]


def test_accelerates_training_estimate_is_the_largest_part_of_its_own_account():
    """What the README sets our full fine-tuning figure beside: accelerate's estimate_training_usage (present in the
    accelerate of every stack) for Llama-3-8B in bf16 is twice the fp32 weights, its optimizer state."""
    from accelerate.commands.estimate import estimate_training_usage

    largest, parts = llama3_8b.accelerate_figure(transformers.LlamaConfig(**llama3_8b.LLAMA3_8B))
    fp32 = 4 * 8_030_261_248
    assert parts["model"] >= fp32 and largest == parts["optimizer"] == 2 * parts["model"]
    assert estimate_training_usage(parts["model"], "bfloat16") == parts


PROGRAM = """
import sys, torch, transformers, peft
folder, output = sys.argv[1:3]
args = transformers.TrainingArguments(output_dir=output, per_device_train_batch_size=1, gradient_accumulation_steps=8,
                                      bf16=True, report_to=[], save_strategy="no")
model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16, device_map={"": 0})
model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=64, target_modules=%r))
sample = {"input_ids": [1] * 512, "attention_mask": [1] * 512, "labels": [1] * 512}
transformers.Trainer(model=model, args=args, train_dataset=[sample]).train()
print("training ran")
"""


def test_the_table_of_mac_sizes_comes_in_seconds_without_weights(tmp_path):
    folder = llama3_8b_folder(tmp_path / "llama3-8b")
    script = tmp_path / "sft.py"
    script.write_text(PROGRAM % (llama3_8b.LORA["target_modules"],))
    report = tmp_path / "report.json"
    started = time.monotonic()
    result = run(
        [MPS_SHIM, "--simulate", "macos=15.1,torch=2.13,memory=128GB", "--report", report, "--log-level", "quiet",
         "plan", "--mac-sizes", "8GB,16GB,24GB,36GB,64GB,128GB", script, folder, tmp_path / "out"],
        env=clean_env(TRANSFORMERS_VERBOSITY="error"), timeout=600,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert elapsed < 120, elapsed  # a shared 2-core machine; the weights alone are a 16 GB download
    assert "training ran" not in result.stdout
    rows = read_json(report)["sizing"]["rows"]
    assert [row["memory_bytes"] // GIB for row in rows] == [8, 16, 24, 36, 64, 128]
    fits = [row["fits"] for row in rows]
    assert fits == sorted(fits) and not fits[0] and fits[-1]  # an 8 GB Mac cannot hold 15 GiB of bf16 weights
    for row in rows:
        assert row["budget_bytes"] == recommended_working_set(row["memory_bytes"])
        assert row["fits"] == (row["estimated_peak_bytes"] <= row["usable_bytes"])
        assert row["frozen_weights_dtype"] == "bfloat16" and row["estimated_peak_bytes"] > 15 * GIB
    table = result.stdout[result.stdout.index("  sizing:"):].splitlines()
    assert table[2].split()[:2] == ["Mac", "budget"] and len(table) >= 3 + len(rows)
    assert re.match(r"\s+8 GB\s+5\.33 GiB\s+no\s", table[3]), table[3]
    assert not [path for path in folder.iterdir() if path.name != "config.json"]


@pytest.mark.parametrize("where", ["option", "variable"])
def test_a_bad_mac_size_is_one_line_and_exit_2_before_any_work(tmp_path, where):
    marker = tmp_path / "ran"
    program = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    if where == "option":
        command, environment = [MPS_SHIM, "--simulate", "1", "plan", "--mac-sizes", "8GB,lots", *program], clean_env()
        name = "--mac-sizes"
    else:
        command, environment = [MPS_SHIM, "--simulate", "1", "plan", *program], clean_env(MPS_SHIM_PLAN_SIZES="lots")
        name = "MPS_SHIM_PLAN_SIZES"
    result = run(command, env=environment)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"mps-shim: {name}='lots' is not a size; use bytes or a number with KB/MB/GB/TB or KiB/MiB/GiB/TiB, e.g. 12GiB"
    )
    assert not marker.exists() and not result.stdout


def test_mac_sizes_are_the_macs_as_sold():
    assert parse_mac_sizes("8GB, 16GB,24GiB,0.5TB", "--mac-sizes") == (8 * GIB, 16 * GIB, 24 * GIB, 500 * GIB)
    with pytest.raises(ShimConfigError, match=r"^--mac-sizes='4GB': 4GB is no Mac's memory"):
        parse_mac_sizes("4GB", "--mac-sizes")


def facts(**changes) -> ModelFacts:
    """A 1B-parameter LLaMA-like model in bf16 with LoRA and a trainable fp32 copy of its head."""
    return ModelFacts(
        weight_bytes=2 * 10**9 + 800 * 2**20, frozen_bytes=2 * 10**9, frozen_float32_bytes=0,
        trainable_bytes=800 * 2**20, trainable_count=200 * 2**20, largest_trainable_bytes=500 * 2**20,
        modules_to_save_bytes=500 * 2**20, modules_to_save_count=125 * 2**20, hidden=2048, intermediate=8192,
        layers=16, heads=32, kv_heads=8, vocab=64000, checkpointing=False,
    )._replace(**changes)


BF16 = PrecisionPlan("bf16", "bf16", "bfloat16", "float32", "bfloat16", False, "mps-shim", "")


def test_each_size_climbs_the_preflights_ladder_and_its_advice_fits():
    shape = Shape(per_device=8, accumulation=2, seq=4096, eval_batch=0, eval_seq=0, compute_bytes=2, optim="adamw_torch")
    rows = {size: size_row(size * GIB, facts(), {}, shape, BF16, None) for size in (8, 16, 24, 64, 128)}
    assert [row["fits"] for row in rows.values()] == [False, False, True, True, True]
    for row in rows.values():
        assert row["budget_bytes"] == recommended_working_set(row["memory_bytes"])
        assert row["fits"] == (row["estimated_peak_bytes"] <= row["usable_bytes"] == int(0.9 * row["budget_bytes"]))
    # As the preflight: the batch is split first, down to one sequence; checkpointing only when that does not fit.
    assert (rows[128]["micro_batch"], rows[128]["chunks_per_batch"], rows[128]["gradient_checkpointing"]) == (1, 8, False)
    assert rows[64]["gradient_checkpointing"] and rows[64]["micro_batch"] > 1
    assert rows[24]["gradient_checkpointing"] and rows[24]["micro_batch"] < rows[64]["micro_batch"]
    # A row that does not fit names what would, and it would: the longest sequence that fits, and not 64 more.
    advice = rows[16]["to_fit"]
    assert len(advice) == 1 and advice[0].startswith("--max_seq_length ")
    shorter = int(advice[0].split()[1])
    assert size_row(16 * GIB, facts(), {}, shape._replace(seq=shorter), BF16, None)["fits"]
    assert not size_row(16 * GIB, facts(), {}, shape._replace(seq=shorter + 64), BF16, None)["fits"]
    assert rows[8]["to_fit"] == []  # weights, optimizer state and gradients alone are over: nothing short of a Mac
    lora = LoraFacts(rank=64, lora_bytes=300 * 2**20, lora_count=75 * 2**20, largest_lora_bytes=2**20,
                     largest_save_bytes=500 * 2**20)
    lighter = size_row(16 * GIB, facts(), {}, shape._replace(seq=shorter + 64), BF16, lora)
    assert not lighter["fits"] and "no --modules_to_save" in lighter["to_fit"]


def test_the_readme_table_is_what_the_script_prints():
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index(llama3_8b.BEGIN) + len(llama3_8b.BEGIN):readme.index(llama3_8b.END)].strip()
    made_with = re.search(r"^Made with (.*)\.$", block, re.M).group(1)
    here = llama3_8b.versions()
    if made_with != here:
        pytest.skip(f"the README's table was made with {made_with}; this stack has {here}")
    started = time.monotonic()
    result = run([sys.executable, REPO / "examples" / "sizing" / "llama3_8b.py"], env=clean_env(), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == block
    assert time.monotonic() - started < 300
