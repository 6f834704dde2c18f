"""The ways to switch the shim on (docs/user-contract.md), who activates in each, and the kill switch."""
import sys
import textwrap

import pytest

from support import clean_env, python, run

HEAVY = ("torch", "transformers", "accelerate", "peft")


def test_import_loads_none_of_the_ml_libraries():
    result = python(
        "import sys, mps_shim; print(mps_shim.report()['active']); "
        f"print([m for m in {HEAVY!r} if m in sys.modules])",
        check=True,
    )
    assert result.stdout.split() == ["True", "[]"]


def test_import_is_idempotent_and_activate_changes_nothing_more():
    code = textwrap.dedent(
        """
        import sys, mps_shim
        from mps_shim import runtime
        first = runtime.current()
        import mps_shim as again
        assert mps_shim.activate() is True
        assert runtime.current() is first, "a second activate() must not rebuild the runtime"
        hooks = len(sys.meta_path)
        mps_shim.activate()
        assert len(sys.meta_path) == hooks
        print("same")
        """
    )
    assert python(code, check=True).stdout.strip() == "same"


def test_activate_with_new_options_wins_over_the_environment():
    code = (
        "import mps_shim; from mps_shim import runtime; mps_shim.activate(precision='fp32'); "
        "print(runtime.current().options.precision)"
    )
    result = python(code, env=clean_env(MPS_SHIM_PRECISION="fp16"), check=True)
    assert result.stdout.strip() == "fp32"


def test_kill_switch_wins_over_import_and_activate():
    code = "import mps_shim; print(mps_shim.activate(precision='fp16'), mps_shim.report()['active'])"
    result = python(code, env=clean_env(MPS_SHIM="0", MPS_SHIM_SIMULATE="1"), check=True)
    assert result.stdout.split() == ["False", "False"]


def test_startup_hook_activates_any_python_process():
    code = "import sys; m = sys.modules.get('mps_shim'); print(bool(m and m.report()['active']))"
    assert python(code, env=clean_env(MPS_SHIM="1"), check=True).stdout.strip() == "True"
    assert python(code, env=clean_env(), check=True).stdout.strip() == "False"
    assert python(code, env=clean_env(MPS_SHIM="0"), check=True).stdout.strip() == "False"


def test_plain_machine_says_it_changes_nothing_in_one_line():
    result = python("import mps_shim, torch; print(mps_shim.report()['changes'])", check=True)
    assert result.stdout.strip() == "[]"
    said = [line for line in result.stderr.splitlines() if line.startswith("mps-shim:")]
    assert said == [
        "mps-shim: no Apple GPU here (device: cpu) and no simulation: nothing that changes the numbers of this run "
        "is changed"
    ]


def test_torch_imported_first_is_reported_in_one_line():
    result = python("import torch, mps_shim", env=clean_env(MPS_SHIM_SIMULATE="1"), check=True)
    notes = [line for line in result.stderr.splitlines() if "PYTORCH_ENABLE_MPS_FALLBACK" in line]
    assert notes == ["mps-shim: PYTORCH_ENABLE_MPS_FALLBACK not set: torch was imported before mps_shim "
                     "(ops MPS lacks run on the CPU instead of stopping the run)"]


def test_fallback_variable_is_set_before_torch_on_a_mac():
    code = "import mps_shim, os, torch; print(os.environ.get('PYTORCH_ENABLE_MPS_FALLBACK'))"
    assert python(code, env=clean_env(MPS_SHIM_SIMULATE="1"), check=True).stdout.strip() == "1"
    assert python(code, env=clean_env(), check=True).stdout.strip() == "None"  # not a Mac: nothing to set


def test_the_entry_points_activate_not_the_import():
    # The command and the start-up hook import mps_shim_entry before the package: activating is then theirs.
    code = "import mps_shim_entry, sys, mps_shim; print(mps_shim.report()['active'], 'mps_shim.startup' in sys.modules)"
    assert python(code, env=clean_env(MPS_SHIM_PRECISION="bf17"), check=True).stdout.split() == ["False", "False"]
    # and importing it costs nothing: it imports nothing
    code = "import sys; before = set(sys.modules); import mps_shim_entry; print(sorted(set(sys.modules) - before))"
    bare = python(code, check=True)
    assert bare.stdout.strip() == "['mps_shim_entry']"


EXIT_STATUS_OF = """
import sys
from mps_shim import errors
kind = sys.argv[1]
if kind == "PlanError":
    raise errors.PlanError("--precision bf16 cannot run on this Mac: why")
if kind == "MemoryPlanError":
    raise errors.MemoryPlanError("the run needs 40 GiB")
if kind == "PlanReached":
    raise errors.PlanReached()
raise ValueError("not ours")
"""


@pytest.mark.parametrize(
    "kind, status, stderr",
    [
        ("PlanError", 2, "mps-shim: --precision bf16 cannot run on this Mac: why\n"),
        ("MemoryPlanError", 3, "mps-shim: the run needs 40 GiB\n"),
        ("PlanReached", 0, ""),
    ],
)
def test_the_startup_hook_maps_the_shims_exceptions_to_their_exit_status(tmp_path, kind, status, stderr):
    script = tmp_path / "x.py"
    script.write_text(EXIT_STATUS_OF)
    result = run([sys.executable, script, kind], env=clean_env(MPS_SHIM="1"))
    assert (result.returncode, result.stderr) == (status, stderr)
    # without the hook (import mps_shim, or no shim at all) they are ordinary exceptions
    plain = run([sys.executable, script, kind], env=clean_env())
    assert plain.returncode == 1 and "Traceback" in plain.stderr


def test_the_startup_hook_leaves_other_exceptions_to_python(tmp_path):
    script = tmp_path / "x.py"
    script.write_text(EXIT_STATUS_OF)
    result = run([sys.executable, script, "other"], env=clean_env(MPS_SHIM="1"))
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == "ValueError: not ours"
