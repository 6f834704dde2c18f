"""mps-shim installed into an environment that pins the previous generation of the stack changes none of it.

stacks/previous.txt pins transformers 4.35.0 with the accelerate and peft of its day, all below mps-shim's tested
ranges. `make test-previous` builds that environment (.venv/previous: the pins only, installed first, as a recipe's
environment has them) and runs this file from the current stack with PREVIOUS_STACK_PYTHON set to its interpreter;
the tests install mps-shim there as a user would (`pip install <source>`, dependencies resolved by pip), then run
`mps-shim doctor` and a plain Trainer script on a simulated Mac with that interpreter. Every other stack skips them.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from support import REPO, clean_env, run
from mps_shim.versions import TESTED_RANGES, out_of_range_lines

PREVIOUS = os.environ.get("PREVIOUS_STACK_PYTHON")
if not PREVIOUS:
    pytest.skip("needs the previous stack's environment: run by `make test-previous`", allow_module_level=True)
PINS = {
    line.split("==")[0]: line.split("==")[1]
    for line in (REPO / "stacks" / "previous.txt").read_text().splitlines()
    if "==" in line and not line.startswith("#")
}
ENVIRONMENT = Path(PREVIOUS).parent.parent
SOURCES = ("pyproject.toml", "setup.py", "README.md", "shim", "patches")
SCRIPT = REPO / "tests" / "scripts" / "plain_trainer.py"
VERSIONS = (
    "import importlib.metadata as m, json\n"
    "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))\n"
)


def previous(*args, **kwargs):
    # Run from the environment's own folder: `python -c` and `-m` put the working directory on sys.path, and the
    # repository's mps_shim.egg-info (left by `pip install -e .`) would count there as an installed mps-shim.
    return run([PREVIOUS, *args], cwd=ENVIRONMENT, **kwargs)


def installed() -> dict[str, str]:
    return json.loads(previous("-c", VERSIONS, check=True).stdout)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A copy of the source to install from, so the repository gets no build/ or egg-info from pip."""
    folder = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def install(source):
    """`pip install SOURCE` into the previous stack without mps-shim: (versions before, pip's result, versions
    after)."""
    previous("-m", "pip", "uninstall", "-y", "-q", "mps-shim", timeout=300)  # from an earlier run of this file
    before = installed()
    result = previous("-m", "pip", "install", "--no-input", source, env=clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1"),
                      timeout=600)
    return before, result, installed()


def test_the_previous_stack_is_what_stacks_previous_txt_pins_and_below_the_tested_ranges():
    versions = installed()
    for name, pinned in PINS.items():
        assert versions[name].split("+")[0] == pinned, name
    assert {"transformers", "accelerate", "peft"} <= {
        line.split()[0] for line in out_of_range_lines({name: versions[name] for name in TESTED_RANGES})
    }


def test_pip_install_succeeds_and_changes_no_installed_version(install):
    before, result, after = install
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "mps-shim" not in before and after["mps-shim"]
    assert after["transformers"] == "4.35.0"
    changed = {name: (version, after.get(name)) for name, version in before.items() if after.get(name) != version}
    assert changed == {}  # nothing upgraded, downgraded or removed: torch, transformers, accelerate, peft and the rest
    # what was added: mps-shim and its own dependencies, none of the libraries it patches
    assert set(after) - set(before) <= {"mps-shim", "wrapt", "click", "psutil", "packaging"}


def test_doctor_names_each_library_outside_the_tested_range_in_one_line(install):
    expected = [
        f"{name} {PINS[name]} is outside mps-shim's tested range ({TESTED_RANGES[name]}): "
        "patches still apply where their targets are found"
        for name in ("transformers", "accelerate", "peft")
    ]
    mps_shim = Path(PREVIOUS).parent / "mps-shim"
    text = run([mps_shim, "doctor"], env=clean_env(), cwd=ENVIRONMENT, timeout=300)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert [line for line in lines if "outside mps-shim's tested range" in line] == expected
    assert not any(line.startswith("torch ") for line in lines)  # torch 2.13.0 is in its range: not named
    findings = json.loads(
        run([mps_shim, "doctor", "--json"], env=clean_env(), cwd=ENVIRONMENT, check=True, timeout=300).stdout
    )
    assert findings["outside_tested_range"] == expected
    assert findings["libraries"]["transformers"] == "4.35.0"


def test_a_plain_trainer_script_trains_on_a_simulated_mac(install, tmp_path):
    # torch 2.5 on macOS 14.5: no bf16 autocast, so --bf16 becomes fp16 with the shim's loss scaler.
    report = tmp_path / "report.json"
    result = previous(
        SCRIPT, "--output_dir", tmp_path / "out", "--max_steps", "6", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", "--bf16",
        env=clean_env(MPS_SHIM_SIMULATE="macos=14.5,torch=2.5,memory=16GiB", MPS_SHIM_REPORT=str(report)),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert outcome == {"finite": True, "steps": 6}
    data = json.loads(report.read_text())
    assert data["device"]["simulated"] is True
    assert data["precision"]["chosen"] == "fp16" and data["precision"]["loss_scaling"] is True
    assert {"TrainingArguments.bf16", "Accelerator.scaler"} <= {change["target"] for change in data["changes"]}
    # every patch found its target in transformers 4.35 and accelerate 0.24: none was skipped
    assert data["patches"]["training_args"] == data["patches"]["trainer"] == "applied", data["patches"]
    assert all(state in ("applied", "not needed") for state in data["patches"].values()), data["patches"]
    assert "'loss_scale'" in result.stdout  # the shim's scaler logs through transformers 4.35's Trainer


def test_the_stack_extra_would_bring_each_patched_library_into_its_tested_range(source):
    # --dry-run: pip resolves `mps-shim[stack]` against this environment and reports what it would install.
    result = previous("-m", "pip", "install", "-q", "--no-input", "--dry-run", "--report", "-", f"{source}[stack]",
                      env=clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    would_install = {
        item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.loads(result.stdout)["install"]
    }
    resulting = {name: would_install.get(name, installed().get(name)) for name in TESTED_RANGES}
    assert out_of_range_lines(resulting) == [], resulting
    assert {"transformers", "accelerate", "peft"} <= set(would_install)  # the pins below the range are replaced
    assert "torch" not in would_install  # torch 2.13.0 is already in its range: kept
