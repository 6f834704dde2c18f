"""Options (interface.md section 3): every bad value stops with one line naming option, value and what is accepted."""
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
