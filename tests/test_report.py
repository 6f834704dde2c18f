"""The report file (docs/user-contract.md, "The report"): its keys and types, when it is written, and when it is not;
where it cannot be written; the one report of a run of several processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from support import MPS_SHIM, clean_env, python, read_json, run

OPTIONAL_STR = (str, type(None))
OPTIONAL_INT = (int, type(None))
PRECISIONS = ("bf16", "fp16", "fp32")

# section -> {key: accepted types}; the report keys of docs/user-contract.md, word for word.
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
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left"


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


# -- a report path that cannot be written --------------------------------------------------------------------------


@pytest.fixture(params=["below a file", "/proc", "/sys"])
def unwritable_report(request, tmp_path):
    """A report path no process can write, root included (a read-only folder would not stop root)."""
    if request.param == "below a file":
        (tmp_path / "a-file").write_text("")
        return str(tmp_path / "a-file" / "report.json")
    return f"{request.param}/mps-shim-test/report.json"


def test_an_unwritable_report_stops_the_command_before_any_work(tmp_path, unwritable_report):
    script = tmp_path / "x.py"
    script.write_text("print('ran')\n")
    result = run([MPS_SHIM, "--report", unwritable_report, script])
    assert (result.returncode, result.stdout) == (2, "")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mps-shim: --report={unwritable_report!r} cannot be written: ")


def test_an_unwritable_report_stops_the_hook_and_raises_in_python(unwritable_report):
    result = python("print('ran')", env=clean_env(MPS_SHIM="1", MPS_SHIM_REPORT=unwritable_report))
    assert (result.returncode, result.stdout) == (2, "")
    lines = result.stderr.strip().splitlines()
    said = f"mps-shim: MPS_SHIM_REPORT={unwritable_report!r} cannot be written: "
    assert len(lines) == 1 and lines[0].startswith(said)
    code = (
        "import mps_shim\n"
        f"try:\n    mps_shim.activate(report={unwritable_report!r})\n"
        "except mps_shim.ShimConfigError as error:\n    print(error)\n"
    )
    said = python(code, check=True).stdout.strip()
    assert said.startswith(f"report={unwritable_report!r} cannot be written: ")


def test_a_report_that_can_no_longer_be_written_is_one_warning_and_the_run_goes_on(tmp_path):
    folder = tmp_path / "reports"
    folder.mkdir()
    code = textwrap.dedent(
        f"""
        import json, shutil
        import mps_shim, torch
        from transformers import TrainingArguments
        shutil.rmtree({str(folder)!r}); open({str(folder)!r}, "w").close()  # the report's folder is now a file
        TrainingArguments(output_dir={str(tmp_path / "out")!r}, bf16=True, report_to=[])
        TrainingArguments(output_dir={str(tmp_path / "out")!r}, fp16=True, report_to=[])
        print(json.dumps([change["target"] for change in mps_shim.report()["changes"]]))
        """
    )
    env = clean_env(MPS_SHIM_SIMULATE="macos=14.5,torch=2.5", MPS_SHIM_REPORT=str(folder / "report.json"))
    result = python(code, env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "TrainingArguments.bf16" in json.loads(result.stdout.strip().splitlines()[-1])  # the patches still work
    warnings = [line for line in result.stderr.splitlines() if "cannot write the report" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"mps-shim: cannot write the report to {folder / 'report.json'}")


# -- one run, several processes, one report ------------------------------------------------------------------------

LAUNCHER = """
import subprocess, sys
import torch  # a launcher that is a Python process with the shim active, as accelerate launch and torchrun are
sys.exit(subprocess.run([sys.executable, *sys.argv[1:]]).returncode)
"""
TRAINER = """
from transformers import TrainingArguments
TrainingArguments(output_dir=OUTPUT, bf16=True, report_to=[])
"""


def launched_run(tmp_path, *launcher):
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "train.py").write_text(TRAINER.replace("OUTPUT", repr(str(tmp_path / "out"))))
    report = tmp_path / "report.json"
    result = run([MPS_SHIM, "--simulate", "1", "--report", report, *launcher, tmp_path / "train.py"], cwd=tmp_path,
                 timeout=300)
    assert result.returncode == 0, result.stderr
    return read_json(report)


def changes_by_process(report: dict) -> list[list[str]]:
    """The targets of each process's changes: the list holds them process after process, each says how many."""
    targets, start = [], 0
    for process in report["processes"]:
        targets.append([c["target"] for c in report["changes"][start:start + process["change_count"]]])
        start += process["change_count"]
    assert start == len(report["changes"])
    return targets


def test_the_report_of_a_launched_run_is_the_training_process(tmp_path):
    report = launched_run(tmp_path, "python", tmp_path / "launcher.py")
    assert schema_problems(report) == []
    assert report["precision"]["requested"] == "bf16" and report["precision"]["chosen"] == "bf16"
    launcher, trainer = report["processes"]
    assert launcher["argv"][0].endswith("launcher.py") and trainer["argv"][0].endswith("train.py")
    # the changes of both processes are kept
    launcher_changes, trainer_changes = changes_by_process(report)
    assert "environment PYTORCH_ENABLE_MPS_FALLBACK" in launcher_changes
    assert "TrainingArguments.bf16" in trainer_changes and "TrainingArguments.bf16" not in launcher_changes


def test_the_report_of_accelerate_launch_is_the_training_process(tmp_path):
    report = launched_run(tmp_path, "accelerate", "launch", "--num_processes", "1", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no")
    assert report["precision"]["requested"] == "bf16" and report["precision"]["chosen"] == "bf16"
    assert [process["argv"][0].endswith("train.py") for process in report["processes"]] == [False, True]


def test_every_python_process_a_command_starts_writes_into_one_report(tmp_path):
    (tmp_path / "train.py").write_text(TRAINER.replace("OUTPUT", repr(str(tmp_path / "out"))))
    (tmp_path / "prepare.py").write_text("import torch\n")  # a change of its own: the variables set before torch
    report = tmp_path / "report.json"
    script = f"{sys.executable} prepare.py && {sys.executable} train.py && {sys.executable} prepare.py"
    result = run([MPS_SHIM, "--simulate", "1", "--report", report, "bash", "-c", script], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    written = read_json(report)
    assert [p["argv"][0] for p in written["processes"]] == ["prepare.py", "train.py", "prepare.py"]
    assert written["precision"]["requested"] == "bf16"  # the training process's, though a later process wrote last
    assert all(changes_by_process(written))  # every process's changes are there


def test_a_report_of_an_earlier_run_is_replaced_not_merged(tmp_path):
    first = launched_run(tmp_path, "python", tmp_path / "launcher.py")
    second = launched_run(tmp_path, "python", tmp_path / "launcher.py")
    assert second["run"] != first["run"] and len(second["processes"]) == 2
    assert not {p["pid"] for p in first["processes"]} & {p["pid"] for p in second["processes"]}


# -- hygiene: the mode of any output file, no temporary files left by killed processes ---------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_the_report_is_created_with_the_users_umask(tmp_path, umask, mode):
    report = tmp_path / "report.json"
    code = (
        "import mps_shim, torch, transformers; "
        "transformers.TrainingArguments(output_dir='out', bf16=True, report_to=[])"
    )
    env = clean_env(MPS_SHIM_SIMULATE="1", MPS_SHIM_REPORT=str(report))
    result = run(["bash", "-c", f'umask {umask:03o} && exec "$0" -c "$1"', sys.executable, code], env=env,
                 cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr
    assert report.stat().st_mode & 0o777 == mode


def test_temporary_files_of_a_process_killed_while_writing_are_removed_by_the_next_writer(tmp_path):
    report = tmp_path / "report.json"
    env = clean_env(MPS_SHIM_SIMULATE="1", MPS_SHIM_REPORT=str(report))
    hangs_while_writing = (
        "import json, time, mps_shim, transformers\n"
        "json.dump = lambda *args, **kwargs: (print('writing', flush=True), time.sleep(120))\n"
        "transformers.TrainingArguments(output_dir='out', bf16=True, report_to=[])\n"
    )
    process = subprocess.Popen([sys.executable, "-c", hangs_while_writing], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".report.json.")]
    assert left and all(name.startswith(f".report.json.{process.pid}-") for name in left), left
    # a temporary file of a process that still runs is not touched
    alive = tmp_path / f".report.json.{os.getpid()}-1.tmp"
    alive.write_text("{}")

    result, _ = tiny_run(tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [alive.name]
    assert "TrainingArguments.bf16" in [c["target"] for c in read_json(report)["changes"]]


# -- doctor --report -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["doctor --report F", "--report F doctor"])
def test_doctor_writes_its_findings_to_the_report(tmp_path, where):
    report = tmp_path / "doctor.json"
    env = clean_env(MPS_SHIM_SIMULATE="macos=15.1,torch=2.13,memory=16GiB")
    args = [report if word == "F" else word for word in where.split()]
    result = run([MPS_SHIM, *args], env=env)
    assert result.returncode == 0, result.stderr
    printed = json.loads(run([MPS_SHIM, "doctor", "--json"], env=env, check=True).stdout)
    assert read_json(report) == printed
