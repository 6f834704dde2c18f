"""`mps-shim plan`: the plan up to where training would start, for programs that train and programs that do not.

Exit statuses (shim/errors.py): 0 when training was reached and stopped, the program's own when it ends without
training (after the plan and a line saying so), 3 when the run cannot fit in memory.
"""
from __future__ import annotations

import sys

from support import MPS_SHIM, REPO, clean_env, run

PLAIN_TRAINER = REPO / "tests" / "scripts" / "plain_trainer.py"
SIMULATE = "macos=15.1,torch=2.13,memory=16GiB"


def test_a_program_that_never_trains_gets_the_plan_and_a_line_saying_so(tmp_path):
    script = tmp_path / "prepare.py"
    script.write_text("import transformers\nprint('prepared the data')\n")
    for command in ([script], ["bash", "-c", f"{sys.executable} {script}"]):  # in-process, and through the hook
        result = run([MPS_SHIM, "--simulate", SIMULATE, "plan", *command], env=clean_env())
        assert result.returncode == 0, result.stderr
        assert "prepared the data" in result.stdout
        assert "mps-shim plan" in result.stdout
        assert "no training was reached" in result.stdout
        assert result.stdout.count("mps-shim plan") == 1


def test_a_run_that_reaches_training_stops_there_with_the_plan(tmp_path):
    result = run(
        [MPS_SHIM, "--simulate", SIMULATE, "plan", PLAIN_TRAINER, "--output_dir", tmp_path / "out",
         "--per_device_train_batch_size", "8", "--report_to", "none", "--max_steps", "2"],
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr
    assert "mps-shim plan (no training was run)" in result.stdout and "micro-batch 8" in result.stdout
    assert "no training was reached" not in result.stdout
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_plan_that_cannot_fit_prints_the_diagnosis_once_and_exits_3(tmp_path):
    result = run(
        [MPS_SHIM, "--simulate", SIMULATE, "--memory-limit", "800KiB", "plan", PLAIN_TRAINER, "--output_dir",
         tmp_path / "out", "--per_device_train_batch_size", "8", "--report_to", "none", "--max_steps", "2"],
        env=clean_env(),
    )
    assert result.returncode == 3, (result.stdout, result.stderr)
    both = result.stdout + result.stderr
    assert both.count("cannot fit in memory") == 2  # in the plan on stdout, and the one error line on stderr
    assert result.stdout.count("cannot fit in memory") == 1
    assert "mps-shim: mps-shim:" not in both and "micro-batch None" not in both
    assert "Traceback" not in result.stderr
