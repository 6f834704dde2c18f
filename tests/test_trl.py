"""TRL's SFTTrainer gets the same treatment as the Trainer scripts: the patches act at the library calls."""
import json
import math

import pytest

from support import MPS_SHIM, REPO, clean_env, read_json, run

pytest.importorskip("trl", reason="TRL is installed in the current stack only (it needs transformers 5)")


def test_sft_trainer_trains_on_a_mac_without_bf16_autocast(tmp_path, tiny_model_dir, sample_validation_file):
    report = tmp_path / "report.json"
    result = run(
        [MPS_SHIM, REPO / "tests" / "scripts" / "trl_sft.py", tiny_model_dir, sample_validation_file, tmp_path / "out"],
        env=clean_env(MPS_SHIM_SIMULATE="macos=14.5,torch=2.5,memory=16GiB", MPS_SHIM_REPORT=str(report)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = read_json(report)
    assert outcome["precision"]["chosen"] == "fp16" and outcome["precision"]["loss_scaling"] is True
    targets = {change["target"] for change in outcome["changes"]}
    assert {"TrainingArguments.bf16", "from_pretrained(device_map=)", "from_pretrained(torch_dtype=)"} <= targets
    trained = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(trained["losses"]) == 4 and all(math.isfinite(loss) for loss in trained["losses"])
    assert trained["lora_b_max"] > 0  # the optimizer steps were applied, not skipped
