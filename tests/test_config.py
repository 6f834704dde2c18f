"""Options (docs/user-contract.md): every bad value stops with one line naming where it came from, the value and what
is accepted; only the value that wins is judged."""
import sys

import pytest

from mps_shim.config import ShimConfigError, load_options, parse_simulation, parse_size
from support import MPS_SHIM, clean_env, python, run


@pytest.mark.parametrize(
    "text, expected",
    [("12GiB", 12 * 2**30), ("12GB", 12 * 10**9), ("800MiB", 800 * 2**20), ("1.5GiB", int(1.5 * 2**30)),
     ("4096", 4096), (" 2 gib ", 2 * 2**30)],
)
def test_sizes(text, expected):
    assert parse_size(text, "--memory-limit") == expected


def test_environment_then_arguments_win():
    environ = {"MPS_SHIM_PRECISION": "fp16", "MPS_SHIM_MEMORY_LIMIT": "8GiB", "MPS_SHIM_LOG_LEVEL": "debug"}
    options = load_options(environ)
    assert (options.precision, options.memory_limit, options.log_level) == ("fp16", 8 * 2**30, "debug")
    assert load_options(environ, precision="fp32").precision == "fp32"


def test_simulation_profiles():
    profile = parse_simulation("macos=13.6,torch=2.2,memory=16GiB", "MPS_SHIM_SIMULATE")
    assert (profile.macos, profile.torch, profile.memory_bytes) == ("13.6", "2.2", 16 * 2**30)
    modern = parse_simulation("1", "MPS_SHIM_SIMULATE", installed_torch="2.13.0+cpu")
    assert (modern.macos, modern.torch, modern.memory_bytes) == ("15.1", "2.13", 32 * 2**30)
    assert parse_simulation("0", "MPS_SHIM_SIMULATE") is None


BAD_VALUES = [
    ("precision", "MPS_SHIM_PRECISION", "bf17", "use one of auto, bf16, fp16, fp32"),
    ("memory_limit", "MPS_SHIM_MEMORY_LIMIT", "lots", "is not a size"),
    ("simulate", "MPS_SHIM_SIMULATE", "macos=13.6,gpu=m3", "is not a simulation profile"),
    ("simulate", "MPS_SHIM_SIMULATE", "macos=13.6,torch=2.13", "describes no real Mac"),
    ("simulate", "MPS_SHIM_SIMULATE", "macos=fourteen", "is not a version"),
    ("report", "MPS_SHIM_REPORT", "/", "is not a file path"),
    ("log_level", "MPS_SHIM_LOG_LEVEL", "loud", "use one of quiet, info, debug"),
]


@pytest.mark.parametrize("name, variable, value, accepted", BAD_VALUES)
def test_bad_value_in_process(name, variable, value, accepted):
    with pytest.raises(ShimConfigError) as from_env:
        load_options({variable: value})
    message = str(from_env.value)
    assert "\n" not in message and variable in message and repr(value) in message and accepted in message
    with pytest.raises(ValueError, match=accepted):  # ShimConfigError is a ValueError
        load_options({}, **{name: value})


@pytest.mark.parametrize("name, variable, value, accepted", BAD_VALUES)
def test_bad_value_on_the_command_line(name, variable, value, accepted, tmp_path):
    flag = "--" + name.replace("_", "-")
    marker = tmp_path / "ran"
    script = tmp_path / "x.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    result = run([MPS_SHIM, flag, value, script])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and repr(value) in lines[0] and accepted in lines[0]
    assert not marker.exists()  # stopped before any work

    from_env = run([MPS_SHIM, script], env=clean_env(**{variable: value}))
    assert from_env.returncode == 2 and variable in from_env.stderr and len(from_env.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_bad_value_through_the_startup_hook_stops_the_process(tmp_path):
    result = python("print('ran')", env=clean_env(MPS_SHIM="1", MPS_SHIM_PRECISION="bf17"))
    assert result.returncode == 2 and "ran" not in result.stdout
    assert result.stderr.strip() == "mps-shim: MPS_SHIM_PRECISION='bf17' is not accepted; use one of auto, bf16, fp16, fp32"


# -- MPS_SHIM: the usual spellings of on and off, anything else refused ------------------------------------------

PROBE = "import sys; m = sys.modules.get('mps_shim'); print(bool(m and m.report()['active']))"
SWITCH_REFUSED = (
    "mps-shim: MPS_SHIM={value!r} is neither on nor off; use 1, true, yes or on to switch the shim on, "
    "0, false, no, off or nothing to switch it off"
)


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_switch_on_spellings_start_the_shim(value):
    assert python(PROBE, env=clean_env(MPS_SHIM=value), check=True).stdout.strip() == "True"


@pytest.mark.parametrize("value", ["0", "false", "No", "off ", ""])
def test_switch_off_spellings_start_nothing_and_kill_import(value):
    assert python(PROBE, env=clean_env(MPS_SHIM=value), check=True).stdout.strip() == "False"
    # the hook's line does not even import the package
    imported = python("import sys; print('mps_shim' in sys.modules)", env=clean_env(MPS_SHIM=value))
    assert imported.stdout.strip() == "False"
    # and it is the kill switch for `import mps_shim`
    killed = python("import mps_shim; print(mps_shim.report()['active'])", env=clean_env(MPS_SHIM=value), check=True)
    assert killed.stdout.strip() == "False"


@pytest.mark.parametrize("value", ["2", "00", "maybe"])
def test_switch_with_another_value_is_one_line_and_exit_2(value, tmp_path):
    hook = python("print('ran')", env=clean_env(MPS_SHIM=value))
    assert (hook.returncode, hook.stdout, hook.stderr.strip()) == (2, "", SWITCH_REFUSED.format(value=value))
    script = tmp_path / "x.py"
    script.write_text("print('ran')\n")
    command = run([MPS_SHIM, script], env=clean_env(MPS_SHIM=value))
    assert (command.returncode, command.stdout, command.stderr.strip()) == (2, "", SWITCH_REFUSED.format(value=value))


def test_switch_with_another_value_raises_in_python():
    code = (
        "import os, mps_shim\n"
        "os.environ['MPS_SHIM'] = 'maybe'\n"
        "try:\n    mps_shim.activate()\nexcept mps_shim.ShimConfigError as error:\n    print(error)\n"
    )
    assert python(code, check=True).stdout.strip() == SWITCH_REFUSED.format(value="maybe")[len("mps-shim: "):]


# -- sizes: at least one byte, one rule for every way in ---------------------------------------------------------

SIZE_REFUSED = "is not a size; use bytes or a number with KB/MB/GB/TB or KiB/MiB/GiB/TiB, e.g. 12GiB"


@pytest.mark.parametrize("value", ["0.5", "0", "0.4B", "0KiB"])
def test_a_size_below_one_byte_is_refused_everywhere(value, tmp_path):
    with pytest.raises(ShimConfigError) as refused:
        load_options({"MPS_SHIM_MEMORY_LIMIT": value})
    assert str(refused.value) == f"MPS_SHIM_MEMORY_LIMIT={value!r} {SIZE_REFUSED}"
    hook = python("print('ran')", env=clean_env(MPS_SHIM="1", MPS_SHIM_MEMORY_LIMIT=value))
    assert hook.returncode == 2 and hook.stdout == "" and SIZE_REFUSED in hook.stderr
    script = tmp_path / "x.py"
    script.write_text("print('ran')\n")
    command = run([MPS_SHIM, "--memory-limit", value, script])
    assert command.returncode == 2 and command.stdout == ""
    assert command.stderr.strip() == f"mps-shim: --memory-limit={value!r} {SIZE_REFUSED}"


@pytest.mark.parametrize("value", [0, -1, True, False, 0.5, 1.5e9, "lots"])
def test_python_memory_limits_that_are_no_size_are_refused(value):
    with pytest.raises(ShimConfigError) as refused:
        load_options({}, memory_limit=value)
    assert str(refused.value) == f"memory_limit={value!r} {SIZE_REFUSED}"
    assert load_options({}, memory_limit=1).memory_limit == 1


# -- the command line wins, and only the value used is judged ---------------------------------------------------


def test_an_option_replaces_a_bad_variable_without_judging_it(tmp_path):
    assert load_options({"MPS_SHIM_PRECISION": "bogus"}, precision="fp32").precision == "fp32"
    script = tmp_path / "x.py"
    script.write_text("import json, mps_shim; print(json.dumps(mps_shim.report()['active']))\n")
    environ = clean_env(MPS_SHIM_PRECISION="bogus", MPS_SHIM_MEMORY_LIMIT="lots", MPS_SHIM_SIMULATE="macos=99")
    result = run([MPS_SHIM, "--precision", "fp32", "--memory-limit", "8GiB", "--simulate", "1", script], env=environ)
    assert (result.returncode, result.stdout.strip()) == (0, "true"), result.stderr


def test_sources_name_where_each_value_came_from():
    options = load_options({"MPS_SHIM_PRECISION": "fp16", "MPS_SHIM_LOG_LEVEL": "debug"}, precision="fp32")
    assert options.sources == {"precision": "precision", "log_level": "MPS_SHIM_LOG_LEVEL"}
    assert load_options({}, flags=True, precision="fp32").sources == {"precision": "--precision"}


def test_an_option_switched_off_does_not_reach_the_program(tmp_path):
    script = tmp_path / "x.py"
    script.write_text("import os; print(repr(os.environ.get('MPS_SHIM_SIMULATE')))\n")
    result = run([MPS_SHIM, "--simulate", "0", "bash", "-c", f"{sys.executable} {script}"],
                 env=clean_env(MPS_SHIM_SIMULATE="1"), check=True)
    assert result.stdout.strip() == "'0'"


# -- simulation profiles: only a Mac that exists ------------------------------------------------------------------

IMPOSSIBLE_MACS = [
    ("torch=1.0", "torch=1.0 is older than 2.2, the oldest torch mps-shim supports"),
    ("torch=99", "torch=99 is newer than 2.15, the newest torch release mps-shim knows the MPS behaviour of"),
    ("torch=2.16", "torch=2.16 is newer than 2.15"),
    ("macos=99", "macOS 99 is not a macOS release that has MPS (those are 12, 13, 14, 15, 26; after 15 came 26)"),
    ("macos=16.0", "macOS 16.0 is not a macOS release that has MPS"),
    ("macos=12.2", "MPS needs macOS 12.3 or newer, not 12.2"),
    ("memory=1B", "memory=1B, but Apple-silicon Macs have 8 GB to 512 GB of unified memory"),
    ("memory=1MiB", "memory=1MiB, but Apple-silicon Macs have 8 GB to 512 GB"),
    ("memory=1TiB", "memory=1TiB, but Apple-silicon Macs have 8 GB to 512 GB"),
]


@pytest.mark.parametrize("profile, reason", IMPOSSIBLE_MACS)
def test_a_profile_no_mac_can_have_is_refused_with_the_reason(profile, reason, tmp_path):
    with pytest.raises(ShimConfigError) as refused:
        parse_simulation(profile, "MPS_SHIM_SIMULATE", installed_torch="2.13.0")
    assert str(refused.value).startswith(f"MPS_SHIM_SIMULATE={profile!r} describes no real Mac: {reason}")
    script = tmp_path / "x.py"
    script.write_text("print('ran')\n")
    command = run([MPS_SHIM, "--simulate", profile, script])
    assert command.returncode == 2 and command.stdout == ""
    assert command.stderr.startswith(f"mps-shim: --simulate={profile!r} describes no real Mac: {reason}")


def test_a_profile_may_give_each_key_once():
    with pytest.raises(ShimConfigError) as refused:
        parse_simulation("macos=14.5,torch=2.6,macos=13.6", "MPS_SHIM_SIMULATE")
    assert str(refused.value) == (
        "MPS_SHIM_SIMULATE='macos=14.5,torch=2.6,macos=13.6' gives macos twice; give each of macos, torch, memory once"
    )


def test_real_macs_at_the_bounds_are_accepted():
    for profile in ("macos=12.3,torch=2.2,memory=8GB", "macos=26.1,torch=2.15,memory=512GiB", "memory=8GiB"):
        assert parse_simulation(profile, "MPS_SHIM_SIMULATE", installed_torch="2.13.0") is not None


def test_the_installed_torch_must_be_one_the_shim_knows():
    with pytest.raises(ShimConfigError, match="the installed torch 2.16.0 is newer than 2.15"):
        parse_simulation("1", "MPS_SHIM_SIMULATE", installed_torch="2.16.0")


# -- Python values: refused as ShimConfigError, like every other way in ------------------------------------------


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("report", 123, "report=123 is not a file path; give the JSON file to write, e.g. report.json"),
        ("precision", 16, "precision=16 is not accepted; use one of auto, bf16, fp16, fp32"),
        ("simulate", 2, "simulate=2 is not a simulation profile"),
        ("simulate", "maybe", "simulate='maybe' is not a simulation profile"),
    ],
)
def test_python_values_of_the_wrong_kind_are_refused(name, value, message):
    with pytest.raises(ShimConfigError) as refused:
        load_options({}, **{name: value})
    assert str(refused.value).startswith(message)


@pytest.mark.parametrize("off", [False, 0, "0", "off", "no"])
def test_simulate_off_in_python_wins_over_the_environment(off):
    assert load_options({"MPS_SHIM_SIMULATE": "1"}, simulate=off).simulate is None


@pytest.mark.parametrize("on", [True, 1, "1", "yes"])
def test_simulate_on_in_python_is_the_modern_mac(on):
    assert load_options({}, simulate=on).simulate.macos == "15.1"


def test_import_with_a_bad_variable_raises_with_a_short_traceback():
    result = python("import mps_shim", env=clean_env(MPS_SHIM_PRECISION="bf17"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (
        "mps_shim.errors.ShimConfigError: MPS_SHIM_PRECISION='bf17' is not accepted; use one of auto, bf16, fp16, fp32"
    )
    frames = [line for line in lines if line.lstrip().startswith("File ")]
    assert len(frames) == 2 and frames[1].endswith("in <module>") and "__init__.py" in frames[1], result.stderr
    # activate() raises the same way: one frame of the caller, one of activate
    code = "import mps_shim\nmps_shim.activate(precision='bf17')\n"
    raised = python(code)
    frames = [line for line in raised.stderr.splitlines() if line.lstrip().startswith("File ")]
    assert raised.stderr.strip().splitlines()[-1] == (
        "mps_shim.errors.ShimConfigError: precision='bf17' is not accepted; use one of auto, bf16, fp16, fp32"
    )
    assert len(frames) == 2 and frames[1].endswith("in activate"), raised.stderr


def test_a_mac_named_in_decimal_gigabytes_is_that_mac():
    # Apple's "16 GB" Mac has 16 GiB: the simulated Mac and the sizing table read a Mac's size the same way.
    from mps_shim.sizing import parse_mac_sizes

    assert parse_simulation("memory=16GB", "MPS_SHIM_SIMULATE").memory_bytes == 16 * 2**30
    assert parse_mac_sizes("16GB", "--mac-sizes") == (16 * 2**30,)
    assert parse_simulation("memory=12000000000", "MPS_SHIM_SIMULATE").memory_bytes == 12 * 2**30
    assert load_options({}, memory_limit="12GB").memory_limit == 12 * 10**9  # a limit stays what it says
