"""Loss scaling, the non-finite guard, --precision, on a plain Hugging Face Trainer script (not our example)."""
import json

import pytest

from support import MPS_SHIM, REPO, clean_env, read_json, run

SCRIPT = REPO / "tests" / "scripts" / "plain_trainer.py"
MODERN_MAC = "macos=15.1,torch=2.13,memory=16GiB"
FP16_MAC = "macos=14.5,torch=2.5,memory=16GiB"


def train(tmp_path, profile, *flags, prefix=(), **env):
    report = tmp_path / "report.json"
    arguments = ["--output_dir", tmp_path / "out", "--max_steps", "6", "--per_device_train_batch_size", "4",
                 "--learning_rate", "1e-3", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
                 *flags]
    result = run([*prefix, SCRIPT, *arguments],
                 env=clean_env(MPS_SHIM_SIMULATE=profile, MPS_SHIM_REPORT=str(report), **env))
    return result, (read_json(report) if report.exists() else None)


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_import_form_gets_the_same_treatment(tmp_path):
    result, report = train(tmp_path, FP16_MAC, "--bf16", prefix=["python"])
    assert result.returncode == 0, result.stderr
    assert report["precision"]["chosen"] == "fp16" and report["precision"]["loss_scaling"] is True
    assert any(c["target"] == "TrainingArguments.bf16" for c in report["changes"])
    assert last_json(result.stdout) == {"finite": True, "steps": 6}
    assert "'loss_scale'" in result.stdout  # the scale is in the Trainer's logs


def test_non_finite_forward_falls_back_and_finishes_with_finite_weights(tmp_path):
    result, report = train(tmp_path, MODERN_MAC, "--fp16", prefix=["python"], INJECT_NON_FINITE="3")
    assert result.returncode == 0, result.stderr
    kinds = [event["kind"] for event in report["events"]]
    poisoned_steps = {event["step"] for event in report["events"] if event["kind"] == "non_finite_loss"}
    assert kinds.count("non_finite_loss") == 3
    fallback = [event for event in report["events"] if event["kind"] == "precision_fallback"]
    assert len(fallback) == 1 and fallback[0]["detail"].startswith("fp16 -> bf16")
    assert report["precision"]["chosen"] == "bf16"
    assert kinds.count("overflow_skipped") == len(poisoned_steps)  # no poisoned step updated the weights
    assert last_json(result.stdout) == {"finite": True, "steps": 6}


def test_precision_option_overrides_the_plan(tmp_path):
    result, report = train(tmp_path, MODERN_MAC, "--bf16", prefix=["python"], MPS_SHIM_PRECISION="fp32")
    assert result.returncode == 0, result.stderr
    assert report["precision"]["chosen"] == "fp32" and report["precision"]["reason"] == "MPS_SHIM_PRECISION=fp32"


@pytest.mark.parametrize("form", ["option", "variable"])
def test_impossible_precision_stops_before_training(tmp_path, form):
    if form == "option":
        result, report = train(tmp_path, FP16_MAC, "--bf16", prefix=[MPS_SHIM, "--precision", "bf16"])
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "mps-shim: --precision bf16 cannot run on this Mac: MPS autocast in bf16 needs torch>=2.6 and macOS 14 "
            "(torch 2.5, macOS 14.5)"
        ]
    else:
        result, report = train(tmp_path, FP16_MAC, "--bf16", prefix=["python"], MPS_SHIM_PRECISION="bf16")
        assert result.returncode != 0
        assert result.stderr.strip().splitlines()[-1].endswith(
            "MPS_SHIM_PRECISION=bf16 cannot run on this Mac: MPS autocast in bf16 needs torch>=2.6 and macOS 14 "
            "(torch 2.5, macOS 14.5)"
        )
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_torchrun_with_two_processes_runs_one_with_the_same_effective_batch(tmp_path):
    result, report = train(
        tmp_path, MODERN_MAC, "--bf16", "--gradient_accumulation_steps", "2",
        prefix=[MPS_SHIM, "torchrun", "--nnodes", "1", "--nproc_per_node", "2"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    batch = report["batch"]
    assert (batch["world_size"], batch["requested_world_size"]) == (1, 2)
    assert (batch["per_device_train_batch_size"], batch["gradient_accumulation_steps"]) == (4, 4)
    assert batch["effective_batch"] == 4 * 2 * 2  # per device x accumulation x the two processes asked for
    assert report["device"]["distributed"] is False
    accumulation = [c for c in report["changes"] if c["target"] == "TrainingArguments.gradient_accumulation_steps"]
    assert accumulation == [{
        "target": "TrainingArguments.gradient_accumulation_steps", "from": 2, "to": 4,
        "reason": "torchrun's 2 processes run as one on the single Apple GPU; the effective batch is kept",
    }]
    assert last_json(result.stdout) == {"finite": True, "steps": 6}
