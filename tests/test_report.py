"""The report file (interface.md section 5): its keys and types, when it is written, and when it is not."""
from __future__ import annotations

import json
import textwrap

import pytest

from support import clean_env, python, read_json

OPTIONAL_STR = (str, type(None))
OPTIONAL_INT = (int, type(None))
PRECISIONS = ("bf16", "fp16", "fp32")

# section -> {key: accepted types}; from interface.md section 5, word for word.
SCHEMA = {
    "device": {
        "type": (str,),
        "simulated": (bool,),
        "macos": OPTIONAL_STR,
        "torch": (str,),
        "memory_total_bytes": OPTIONAL_INT,
        "memory_budget_bytes": OPTIONAL_INT,
        "distributed": (bool,),
    },
    "precision": {
        "requested": (str,),
        "chosen": (str,),
        "weights_dtype": (str,),
        "autocast_dtype": OPTIONAL_STR,
        "loss_scaling": (bool,),
        "reason": (str,),
    },
    "batch": {
        "per_device_train_batch_size": (int,),
        "gradient_accumulation_steps": (int,),
        "world_size": (int,),
        "micro_batch": (int,),
        "effective_batch": (int,),
    },
    "memory": {"budget_bytes": OPTIONAL_INT, "estimated_peak_bytes": OPTIONAL_INT, "measured_peak_bytes": OPTIONAL_INT},
}


def schema_problems(report: dict) -> list[str]:
    problems = []
    if not isinstance(report.get("shim_version"), str):
        problems.append("shim_version")
    if not isinstance(report.get("active"), bool):
        problems.append("active")
    for section, keys in SCHEMA.items():
        values = report.get(section)
        if not isinstance(values, dict):
            problems.append(f"{section} is not an object")
            continue
        for key, types in keys.items():
            if key not in values:
                problems.append(f"{section}.{key} missing")
            elif isinstance(values[key], bool) and bool not in types:
                problems.append(f"{section}.{key}={values[key]!r} is a bool")
            elif not isinstance(values[key], types):
                problems.append(f"{section}.{key}={values[key]!r} is not {types}")
    for name, keys in (("changes", ("target", "from", "to", "reason")), ("events", ("kind", "step", "detail"))):
        entries = report.get(name)
        if not isinstance(entries, list):
            problems.append(f"{name} is not a list")
            continue
        for entry in entries:
            if not isinstance(entry, dict) or set(keys) - set(entry):
                problems.append(f"{name} entry {entry!r} lacks one of {keys}")
            elif name == "changes" and not (isinstance(entry["target"], str) and isinstance(entry["reason"], str)
                                            and entry["reason"]):
                problems.append(f"change {entry!r}: target and reason must be text")
            elif name == "events" and not (isinstance(entry["kind"], str) and isinstance(entry["step"], OPTIONAL_INT)
                                           and isinstance(entry["detail"], str)):
                problems.append(f"event {entry!r} has the wrong types")
    return problems


ARGUMENTS = "TrainingArguments(output_dir={output!r}, bf16=True, report_to=[])"


def tiny_run(tmp_path, after: str = "", simulate: str = "1", **env):
    """A script that imports the shim, torch and transformers and builds TrainingArguments(bf16=True)."""
    report = tmp_path / "report.json"
    code = textwrap.dedent(
        f"""
        import json, os, sys
        import mps_shim, torch, transformers
        from transformers import TrainingArguments
        arguments = {ARGUMENTS.format(output=str(tmp_path / "out"))}
        """
    ) + textwrap.dedent(after)
    result = python(code, env=clean_env(MPS_SHIM_SIMULATE=simulate, MPS_SHIM_REPORT=str(report), **env), timeout=180)
    return result, report


def test_report_has_every_required_key_and_type(tmp_path):
    simulate = "1"
    result, report_path = tiny_run(tmp_path, simulate=simulate)
    assert result.returncode == 0, result.stderr
    report = read_json(report_path)
    assert schema_problems(report) == []
    assert report["active"] is True
    device = report["device"]
    assert (device["type"], device["simulated"], device["distributed"]) == ("mps", True, False)
    assert device["memory_budget_bytes"] == report["memory"]["budget_bytes"] and device["memory_budget_bytes"] > 0
    precision = report["precision"]
    assert precision["requested"] == "bf16" and precision["chosen"] in PRECISIONS
    assert precision["chosen"] == ("bf16" if simulate == "1" else "fp16")
    assert precision["loss_scaling"] is (precision["chosen"] == "fp16")
    batch = report["batch"]
    assert batch["effective_batch"] == batch["per_device_train_batch_size"] * batch["gradient_accumulation_steps"] \
        * batch["world_size"]
    targets = [change["target"] for change in report["changes"]]
    assert "TrainingArguments.bf16" in targets
    assert len(targets) == len(set(targets)), "each change is reported once"


def test_report_is_rewritten_after_each_change(tmp_path):
    after = """
    on_disk = lambda: json.load(open(os.environ["MPS_SHIM_REPORT"]))
    before = [c["target"] for c in on_disk()["changes"]]
    arguments = TrainingArguments(output_dir=arguments.output_dir, fp16=True, report_to=[])
    after = on_disk()
    in_memory = mps_shim.report()
    mps_shim.deactivate()
    print(json.dumps({"before": before, "after": after, "in_memory": in_memory, "api_after_deactivate":
                      mps_shim.report()["active"], "file_after_deactivate": on_disk()["active"]}))
    """
    # torch 2.5 on macOS 14.5: bf16 becomes fp16 (one change), then a second TrainingArguments asks for fp16 (another).
    result, _ = tiny_run(tmp_path, after, simulate="macos=14.5,torch=2.5")
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert "TrainingArguments.bf16" in seen["before"]  # on disk while the process still runs
    after = [change["target"] for change in seen["after"]["changes"]]
    assert "TrainingArguments.fp16" in after and "TrainingArguments.fp16" not in seen["before"]
    assert seen["after"] == seen["in_memory"]  # the file is the report as it stands, not an older state
    assert schema_problems(seen["after"]) == []
    assert seen["after"]["precision"]["chosen"] == "fp16" and seen["after"]["precision"]["loss_scaling"] is True
    # deactivate() says so in the API and in the file
    assert (seen["api_after_deactivate"], seen["file_after_deactivate"]) == (False, False)


@pytest.mark.parametrize("crash", ["raise RuntimeError('boom')", "os._exit(3)"], ids=["exception", "hard exit"])
def test_a_crash_leaves_a_valid_report(tmp_path, crash):
    result, report_path = tiny_run(tmp_path, crash)
    assert result.returncode != 0
    report = json.loads(report_path.read_text())  # a whole JSON document, not half a file
    assert schema_problems(report) == []
    assert "TrainingArguments.bf16" in [change["target"] for change in report["changes"]]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mps-shim-report.")], "temporary files left"


@pytest.mark.parametrize("code", ["pass", "import mps_shim", "import mps_shim, torch"])
def test_a_process_that_changed_nothing_writes_no_report(tmp_path, code):
    report = tmp_path / "x.json"
    result = python(code, env=clean_env(MPS_SHIM="1", MPS_SHIM_REPORT=str(report)), cwd=tmp_path, check=True)
    assert result.returncode == 0
    assert not report.exists()
    assert list(tmp_path.iterdir()) == []


def test_report_when_the_shim_is_off():
    code = "import json, mps_shim; print(json.dumps(mps_shim.report()))"
    report = json.loads(python(code, env=clean_env(MPS_SHIM="0", MPS_SHIM_SIMULATE="1"), check=True).stdout)
    assert report["active"] is False
    assert report["changes"] == [] and report["events"] == []
    assert isinstance(report["shim_version"], str)
