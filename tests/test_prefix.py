"""The prefix command: `mps-shim script.py ...` and `mps-shim <any launcher> ...` (docs/user-contract.md)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from support import MPS_SHIM, clean_env, run

# Whether the shim is active in this process, without importing it (importing it would activate it).
ACTIVE = "bool(sys.modules.get('mps_shim') and sys.modules['mps_shim'].report()['active'])"
REPORTS_STATE = f"import json, sys; print(json.dumps({{'active': {ACTIVE}}}))"


@pytest.fixture
def script_dir(tmp_path):
    (tmp_path / "build_dataset.py").write_text("VALUE = 'sibling'\n")
    (tmp_path / "train.py").write_text(
        textwrap.dedent(
            """
            import json, sys
            import build_dataset  # a sibling module, as the upstream SFT script imports its build_dataset
            print(json.dumps({
                "argv": sys.argv[1:], "name": __name__, "path0": sys.path[0], "sibling": build_dataset.VALUE,
                "active": ACTIVE,
            }))
            sys.exit(int(sys.argv[-1]) if sys.argv[-1].isdigit() else 0)
            """
        ).replace("ACTIVE", ACTIVE)
    )
    return tmp_path


def test_script_runs_as_python_would(script_dir):
    args = ["--flag", "x", "--bf16", "3"]
    shimmed = run([MPS_SHIM, script_dir / "train.py", *args])
    plain = run([sys.executable, script_dir / "train.py", *args])
    assert shimmed.returncode == plain.returncode == 3
    seen_shimmed, seen_plain = json.loads(shimmed.stdout), json.loads(plain.stdout)
    assert seen_shimmed.pop("active") is True and seen_plain.pop("active") is False
    assert seen_shimmed == seen_plain == {
        "argv": args, "name": "__main__", "path0": str(script_dir), "sibling": "sibling",
    }


def test_run_subcommand_is_the_explicit_form(script_dir):
    result = run([MPS_SHIM, "run", script_dir / "train.py", "doctor"])
    assert json.loads(result.stdout)["argv"] == ["doctor"]


def test_shim_options_before_the_program_and_program_options_after(script_dir):
    result = run([MPS_SHIM, "--precision", "fp32", script_dir / "train.py", "--precision", "fp16"])
    assert json.loads(result.stdout)["argv"] == ["--precision", "fp16"]


def test_missing_program_is_one_line(tmp_path):
    missing = run([MPS_SHIM, tmp_path / "nope.py"])
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nope.py" in missing.stderr
    unknown = run([MPS_SHIM, "no-such-program-xyz"])
    assert unknown.returncode == 127 and unknown.stderr.strip() == "mps-shim: no-such-program-xyz: command not found"


def test_ctrl_c_reaches_the_script(tmp_path):
    script = tmp_path / "wait.py"
    script.write_text(
        "import time\ntry:\n    print('ready', flush=True); time.sleep(60)\n"
        "except KeyboardInterrupt:\n    print('interrupted', flush=True); raise\n"
    )
    process = subprocess.Popen([MPS_SHIM, str(script)], env=clean_env(), stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=30)
    assert "interrupted" in out
    assert process.returncode in (-signal.SIGINT, 130)  # as python itself ends on an uncaught KeyboardInterrupt


def test_every_python_process_of_a_shell_script_is_shimmed(tmp_path):
    (tmp_path / "worker.py").write_text(f"import json, sys\nprint(json.dumps({{'who': 'worker', 'active': {ACTIVE}}}))\n")
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(f"import json, sys\nprint(json.dumps({{'who': 'module', 'active': {ACTIVE}}}))\n")
    (tmp_path / "run.sh").write_text(
        textwrap.dedent(
            """
            set -e
            cd "$(dirname "$0")"
            torchrun --nnodes 1 --nproc_per_node 1 worker.py
            python -m pkg
            """
        )
    )
    result = run([MPS_SHIM, "bash", tmp_path / "run.sh"], check=True)
    seen = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {entry["who"]: entry["active"] for entry in seen} == {"worker": True, "module": True}
    # and without the prefix, nothing is shimmed
    plain = run(["bash", tmp_path / "run.sh"], check=True)
    assert all(not json.loads(line)["active"] for line in plain.stdout.splitlines() if line.startswith("{"))


def test_exit_status_of_a_command_is_passed_through():
    assert run([MPS_SHIM, "bash", "-c", "exit 7"]).returncode == 7


def test_kill_switch_runs_the_program_unshimmed(tmp_path):
    script = tmp_path / "x.py"
    script.write_text(REPORTS_STATE)
    result = run([MPS_SHIM, script], env=clean_env(MPS_SHIM="0"), check=True)
    assert json.loads(result.stdout) == {"active": False}
    child = run([MPS_SHIM, "bash", "-c", f"{sys.executable} {script}"], env=clean_env(MPS_SHIM="0"), check=True)
    assert json.loads(child.stdout) == {"active": False}


@pytest.mark.parametrize("kind", ["folder", "file without the run bit"])
def test_a_program_that_cannot_be_executed_is_one_line_and_126(tmp_path, kind):
    program = tmp_path / "thing"
    if kind == "folder":
        program.mkdir()
        said = "Is a directory"
    else:
        program.write_text("#!/bin/sh\necho ran\n")
        program.chmod(0o644)
        said = "Permission denied"
    result = run([MPS_SHIM, program])
    assert (result.returncode, result.stdout, result.stderr) == (126, "", f"mps-shim: {program}: {said}\n")
    shell = run(["bash", "-c", f"{program}"])  # what a shell says, for comparison
    assert shell.returncode == 126 and said in shell.stderr


def test_a_script_whose_interpreter_is_missing_is_one_line_and_126(tmp_path):
    program = tmp_path / "thing"
    program.write_text("#!/no/such/interpreter\necho ran\n")
    program.chmod(0o755)
    result = run([MPS_SHIM, program])
    assert (result.returncode, result.stderr) == (126, f"mps-shim: {program}: No such file or directory\n")


@pytest.mark.parametrize("subcommand", ["run", "plan"])
@pytest.mark.parametrize("asking", ["--help", "-h"])
def test_help_of_run_and_plan(subcommand, asking, script_dir):
    result = run([MPS_SHIM, subcommand, asking])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: mps-shim {subcommand} [OPTIONS] PROGRAM [ARGS]...")
    # after the program, --help is the program's own
    passed = run([MPS_SHIM, subcommand, script_dir / "train.py", asking])
    assert json.loads(passed.stdout)["argv"] == [asking]


@pytest.mark.parametrize("form", ["option", "variable"])
def test_an_impossible_precision_names_where_it_was_given(tmp_path, form):
    script = tmp_path / "x.py"
    script.write_text("print('ran')\n")
    fp16_mac = {"MPS_SHIM_SIMULATE": "macos=14.5,torch=2.5,memory=16GiB"}
    if form == "option":
        result = run([MPS_SHIM, "--precision", "bf16", script], env=clean_env(**fp16_mac))
        given = "--precision bf16"
    else:
        result = run([MPS_SHIM, script], env=clean_env(MPS_SHIM_PRECISION="bf16", **fp16_mac))
        given = "MPS_SHIM_PRECISION=bf16"
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.strip().splitlines() == [
        f"mps-shim: {given} cannot run on this Mac: MPS autocast in bf16 needs torch>=2.6 and macOS 14 "
        "(torch 2.5, macOS 14.5)"
    ]
