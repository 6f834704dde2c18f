"""`mps-shim doctor`, run as a user would (docs/user-contract.md)."""
from __future__ import annotations

import json

import pytest

from support import MPS_SHIM, clean_env, python, run

RECIPE = "--bf16 --torch_dtype bfloat16"


def doctor(*args, env=None):
    return run([MPS_SHIM, *args], env=env or clean_env(), timeout=120)


def doctor_json(*args, env=None) -> dict:
    result = doctor(*args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_plain_linux_machine_has_no_apple_gpu_and_nothing_would_change():
    result = doctor("doctor")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("device: cpu") for line in lines), result.stdout
    assert "capabilities: no Apple GPU (cpu)" in result.stdout
    assert f"precision for a run with {RECIPE}: bf16 (no Apple GPU (device: cpu): the run keeps the precision it " \
           "asked for)" in lines
    assert "budget unknown (no Apple GPU (cpu): no budget is enforced)" in result.stdout

    findings = doctor_json("doctor")
    assert findings["device"]["type"] == "cpu" and findings["device"]["simulated"] is False
    assert findings["capabilities"]["mps"] is False
    assert findings["memory"]["budget_bytes"] is None
    for label in (RECIPE, "--fp16"):
        choice = findings["precision"][label]
        assert choice["chosen"] == ("bf16" if label == RECIPE else "fp16")  # kept as asked
        assert choice["loss_scaling"] is False and choice["weights_dtype"] is None
        assert "no Apple GPU" in choice["reason"]
    assert findings["libraries"]["torch"].startswith("2.13")


PROFILES = [
    # profile, bf16 tensors, autocast dtypes, what the recipe gets, words of its reason
    ("macos=13.6,torch=2.2", False, [], "fp32", "bf16 tensors on MPS need torch>=2.3 and macOS 14"),
    ("macos=14.5,torch=2.5", True, ["fp16"], "fp16", "MPS autocast in bf16 needs torch>=2.6 and macOS 14"),
    ("macos=15.1,torch=2.13", True, ["bf16", "fp16"], "bf16", "MPS runs bf16 autocast here"),
]


@pytest.mark.parametrize("profile, bf16, autocast, chosen, because", PROFILES, ids=[p[0] for p in PROFILES])
def test_simulated_macs_get_the_precision_their_capabilities_allow(profile, bf16, autocast, chosen, because):
    findings = doctor_json("doctor", env=clean_env(MPS_SHIM_SIMULATE=profile))
    macos, torch = (item.split("=")[1] for item in profile.split(","))
    device = findings["device"]
    assert (device["type"], device["simulated"], device["macos"], device["torch"]) == ("mps", True, macos, torch)
    capabilities = findings["capabilities"]
    assert capabilities["mps"] is True
    assert capabilities["bf16_tensors"]["value"] is bf16
    assert capabilities["autocast_dtypes"]["value"] == autocast
    for entry in ("bf16_tensors", "autocast_dtypes", "loss_scaling", "fused_adamw"):
        assert capabilities[entry]["reason"], entry
    if not bf16:
        assert capabilities["bf16_tensors"]["reason"] == "BFloat16 is not supported on MPS"  # torch 2.2's own text
    recipe = findings["precision"][RECIPE]
    assert recipe["chosen"] == chosen
    assert because in recipe["reason"]
    assert recipe["loss_scaling"] is (chosen == "fp16")
    assert findings["memory"]["budget_bytes"] == findings["device"]["recommended_max_bytes"] > 0

    text = doctor("doctor", env=clean_env(MPS_SHIM_SIMULATE=profile))
    assert text.returncode == 0
    assert f"precision for a run with {RECIPE}: {chosen} (" in text.stdout
    assert f"device: simulated Apple GPU, macOS {macos}, torch {torch} behaviour" in text.stdout


def test_the_simulate_option_of_the_command_equals_the_variable():
    by_option = doctor_json("--simulate", "macos=14.5,torch=2.5", "doctor")
    by_variable = doctor_json("doctor", env=clean_env(MPS_SHIM_SIMULATE="macos=14.5,torch=2.5"))
    assert by_option["capabilities"] == by_variable["capabilities"]
    assert by_option["precision"] == by_variable["precision"]


def test_forced_bf16_is_refused_with_the_reason_where_mps_cannot_run_it():
    findings = doctor_json("doctor", "--precision", "bf16", env=clean_env(MPS_SHIM_SIMULATE="macos=14.5,torch=2.5"))
    recipe = findings["precision"][RECIPE]
    assert recipe["chosen"] is None
    assert recipe["reason"] == (
        "--precision bf16 cannot run on this Mac: MPS autocast in bf16 needs torch>=2.6 and macOS 14 "
        "(torch 2.5, macOS 14.5)"
    )
    assert findings["precision"]["supported"] == ["fp16", "fp32"]
    text = doctor("doctor", "--precision", "bf16", env=clean_env(MPS_SHIM_SIMULATE="macos=14.5,torch=2.5"))
    assert text.returncode == 0
    assert f"precision for a run with {RECIPE}: refused (--precision bf16 cannot run on this Mac" in text.stdout


def test_forced_bf16_where_it_runs_is_kept():
    findings = doctor_json("doctor", "--precision", "bf16", env=clean_env(MPS_SHIM_SIMULATE="macos=15.1,torch=2.13"))
    assert findings["precision"]["--fp16"]["chosen"] == "bf16"
    assert findings["precision"]["--fp16"]["reason"] == "--precision bf16"


def test_memory_limit_sets_the_budget():
    env = clean_env(MPS_SHIM_SIMULATE="macos=15.1,torch=2.13,memory=16GiB")
    findings = doctor_json("doctor", "--memory-limit", "8GiB", env=env)
    assert findings["memory"]["budget_bytes"] == 8 * 2**30
    assert findings["memory"]["reason"] == "--memory-limit"
    assert findings["memory"]["total_bytes"] == 16 * 2**30
    text = doctor("doctor", "--memory-limit", "8GiB", env=env)
    assert "budget 8.00 GiB (--memory-limit)" in text.stdout


def test_bad_option_of_doctor_is_one_line_and_exit_2():
    result = doctor("doctor", "--memory-limit", "lots")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mps-shim: --memory-limit='lots' is not a size; use bytes or a number with KB/MB/GB/TB or KiB/MiB/GiB/TiB, "
        "e.g. 12GiB"
    ]


def test_doctor_under_simulation_does_not_import_torch():
    code = (
        "import sys\n"
        "from mps_shim.config import load_options\n"
        "from mps_shim.doctor import diagnose, render\n"
        "findings = diagnose(load_options())\n"
        "render(findings)\n"
        "print(findings['precision']['--bf16 --torch_dtype bfloat16']['chosen'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'peft') if m in sys.modules))\n"
    )
    result = python(code, env=clean_env(MPS_SHIM_SIMULATE="macos=14.5,torch=2.5"), check=True)
    assert result.stdout.split("\n")[:2] == ["fp16", "[]"]


def test_the_doctor_command_under_simulation_does_not_import_torch():
    # -X importtime lists every module the process imports, the command's own entry point included.
    import sys

    result = run([sys.executable, "-X", "importtime", MPS_SHIM, "doctor", "--json"],
                 env=clean_env(MPS_SHIM_SIMULATE="macos=14.5,torch=2.5"), check=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "mps_shim.doctor" in imported  # the listing works
    assert not {"torch", "transformers", "accelerate", "peft"} & imported
    assert json.loads(result.stdout)["device"]["simulated"] is True


def test_a_torch_and_macos_pair_without_mps_is_refused_with_the_reason():
    result = run([MPS_SHIM, "--simulate", "macos=13.6,torch=2.10", "doctor"])
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        "torch 2.10 has no MPS device below macOS 14.0 (its MPS device needs a macOS 14.0 MPSGraph API): it installs "
        "on macOS 13.6, but runs on the CPU there"
    )
