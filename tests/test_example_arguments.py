"""The example's command-line surface is the upstream's (the same argument names, types and defaults),
and run_sft.sh passes the upstream's flags, with a seed even under sh."""

import dataclasses
import importlib.util
import json
import os
import stat
import subprocess
import sys
from typing import Optional

import pytest
import transformers
import transformers.utils
from packaging.version import Version
from transformers import HfArgumentParser, TrainingArguments

from conftest import EXAMPLE_SFT_DIR

# (name, type, default) as listed in the reference, §1.2.
MODEL_ARGUMENTS = [
    ("model_name_or_path", Optional[str], None),
    ("tokenizer_name_or_path", Optional[str], None),
    ("config_overrides", Optional[str], None),
    ("config_name", Optional[str], None),
    ("tokenizer_name", Optional[str], None),
    ("cache_dir", Optional[str], None),
    ("use_fast_tokenizer", bool, False),
    ("model_revision", str, "main"),
    ("use_auth_token", bool, False),
    ("torch_dtype", Optional[str], None),
    ("low_cpu_mem_usage", bool, False),
]
DATA_TRAINING_ARGUMENTS = [
    ("dataset_dir", Optional[str], None),
    ("train_file", Optional[str], None),
    ("validation_file", Optional[str], None),
    ("overwrite_cache", bool, False),
    ("validation_split_percentage", Optional[float], 0.05),
    ("preprocessing_num_workers", Optional[int], None),
    ("keep_linebreaks", bool, True),
    ("data_cache_dir", Optional[str], None),
    ("max_seq_length", Optional[int], 1024),
]
EXTRA_TRAINING_ARGUMENTS = [
    ("trainable", Optional[str], "q_proj,v_proj"),
    ("lora_rank", Optional[int], 8),
    ("lora_dropout", Optional[float], 0.1),
    ("lora_alpha", Optional[float], 32.0),
    ("modules_to_save", Optional[str], None),
    ("peft_path", Optional[str], None),
    ("use_flash_attention_2", Optional[bool], False),
    ("double_quant", Optional[bool], True),
    ("quant_type", Optional[str], "nf4"),
    ("load_in_kbits", Optional[int], 16),
    ("full_finetuning", Optional[bool], False),
]

TRANSFORMERS_VERSION = Version(transformers.__version__)


@pytest.fixture(scope="module")
def sft_script(monkeypatch_module):
    """The example script imported as a module (its main() is not run).

    transformers 5 removed transformers.utils.send_example_telemetry, which the script imports as
    upstream does; on such a stack the import fails (see test_example_without_shim.py). To read the
    argument surface there, put back a no-op, as the shim will.
    """
    if not hasattr(transformers.utils, "send_example_telemetry"):
        monkeypatch_module.setattr(transformers.utils, "send_example_telemetry", lambda *args, **kwargs: None,
                                   raising=False)
    monkeypatch_module.syspath_prepend(str(EXAMPLE_SFT_DIR))
    spec = importlib.util.spec_from_file_location("run_clm_sft_with_peft", EXAMPLE_SFT_DIR / "run_clm_sft_with_peft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield monkeypatch


def surface(fields):
    return [(field.name, field.type, field.default) for field in fields]


def test_model_arguments_match_the_reference(sft_script):
    assert surface(dataclasses.fields(sft_script.ModelArguments)) == MODEL_ARGUMENTS
    torch_dtype = next(f for f in dataclasses.fields(sft_script.ModelArguments) if f.name == "torch_dtype")
    assert torch_dtype.metadata["choices"] == ["auto", "bfloat16", "float16", "float32"]


def test_data_training_arguments_match_the_reference(sft_script):
    assert surface(dataclasses.fields(sft_script.DataTrainingArguments)) == DATA_TRAINING_ARGUMENTS


def test_training_arguments_add_exactly_the_upstream_fields(sft_script):
    inherited = {field.name for field in dataclasses.fields(TrainingArguments)}
    added = [field for field in dataclasses.fields(sft_script.MyTrainingArguments) if field.name not in inherited]
    assert issubclass(sft_script.MyTrainingArguments, TrainingArguments)
    assert surface(added) == EXTRA_TRAINING_ARGUMENTS


def test_config_overrides_with_a_model_is_refused(sft_script):
    with pytest.raises(ValueError, match="config_overrides"):
        sft_script.ModelArguments(model_name_or_path="m", config_overrides="n_embd=10")


def test_single_json_argument_is_accepted(sft_script, tmp_path, monkeypatch):
    arguments = {"model_name_or_path": "some/model", "dataset_dir": "data", "output_dir": str(tmp_path / "out"),
                 "lora_rank": 4, "modules_to_save": "embed_tokens,lm_head", "max_seq_length": 128}
    json_file = tmp_path / "arguments.json"
    json_file.write_text(json.dumps(arguments))
    monkeypatch.setattr(sys, "argv", ["run_clm_sft_with_peft.py", str(json_file)])
    model_args, data_args, training_args = sft_script.parse_arguments()
    assert model_args.model_name_or_path == "some/model"
    assert (data_args.dataset_dir, data_args.max_seq_length) == ("data", 128)
    assert (training_args.lora_rank, training_args.modules_to_save) == (4, "embed_tokens,lm_head")


@pytest.fixture
def run_sft_argv(tmp_path):
    """The arguments run_sft.sh hands to torchrun, captured by a stand-in torchrun, run under sh."""
    capture_file = tmp_path / "torchrun_argv.json"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_torchrun = fake_bin / "torchrun"
    fake_torchrun.write_text(
        f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(capture_file)!r}, 'w'))\n")
    fake_torchrun.chmod(fake_torchrun.stat().st_mode | stat.S_IEXEC)
    env = {key: value for key, value in os.environ.items() if key != "SEED"}
    env["PATH"] = f"{fake_bin}{os.pathsep}{env['PATH']}"
    subprocess.run(["sh", str(EXAMPLE_SFT_DIR / "run_sft.sh")], check=True, env=env, cwd=tmp_path)
    return json.loads(capture_file.read_text())


def test_run_sft_sh_launches_the_script_next_to_it_with_torchrun(run_sft_argv):
    assert run_sft_argv[:4] == ["--nnodes", "1", "--nproc_per_node", "1"]
    assert run_sft_argv[4] == str(EXAMPLE_SFT_DIR / "run_clm_sft_with_peft.py")


def test_run_sft_sh_keeps_the_upstream_flags(run_sft_argv):
    flags = run_sft_argv[5:]
    value = {flag: flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag.startswith("--")}
    for switch in ["--do_train", "--do_eval", "--low_cpu_mem_usage", "--bf16", "--overwrite_output_dir"]:
        assert switch in flags
    assert value["--torch_dtype"] == "bfloat16"
    assert value["--evaluation_strategy"] == "steps"
    assert value["--load_in_kbits"] == "16"
    assert value["--modules_to_save"] == "embed_tokens,lm_head"
    assert value["--trainable"] == "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj"
    assert value["--ddp_timeout"] == "30000"
    assert value["--ddp_find_unused_parameters"] == "False"
    assert value["--seed"].isdigit()  # upstream's bare $RANDOM is empty under sh (issue #42)
    assert os.path.isdir(value["--dataset_dir"]) and os.path.isfile(value["--validation_file"])


def flags_unknown_to_the_installed_transformers():
    """Upstream flags that the installed transformers no longer accepts.

    --evaluation_strategy went in 4.51 (reference §4); --warmup_ratio and --overwrite_output_dir are
    gone on transformers 5 (seen on 5.24: warmup_steps now also takes a ratio).
    """
    unknown = set()
    if TRANSFORMERS_VERSION >= Version("4.51"):
        unknown.add("--evaluation_strategy")
    if TRANSFORMERS_VERSION.major >= 5:
        unknown |= {"--warmup_ratio", "--overwrite_output_dir"}
    return unknown


def test_run_sft_sh_flags_known_to_the_parser(sft_script, run_sft_argv):
    parser = HfArgumentParser((sft_script.ModelArguments, sft_script.DataTrainingArguments,
                               sft_script.MyTrainingArguments))
    _, leftovers = parser.parse_known_args(run_sft_argv[5:])
    assert {item for item in leftovers if item.startswith("--")} == flags_unknown_to_the_installed_transformers()
