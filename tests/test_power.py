"""A long run on a (simulated) Mac: no sleep for the life of the program, battery and Low Power Mode named at the start.

`caffeinate` and `pmset` are stand-ins put first on PATH: caffeinate records its arguments and when it lets go,
pmset prints what a Mac on battery / in Low Power Mode prints.
"""
from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest

from support import MPS_SHIM, clean_env, read_json, run

from mps_shim.power import power_warnings

CAFFEINATE = """\
#!/bin/sh
# stand-in: record the arguments, hold until the process after -w ends, record that
log="$STANDIN_LOG"
echo "start $*" >> "$log"
pid=""
while [ $# -gt 0 ]; do [ "$1" = "-w" ] && pid="$2"; shift; done
while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
echo "released $pid" >> "$log"
"""

PMSET = """\
#!/bin/sh
if [ "$1 $2" = "-g batt" ]; then
  echo "Now drawing from '$STANDIN_POWER'"
  echo " -InternalBattery-0 (id=1234)	81%; discharging; 4:02 remaining present: true"
else
  echo "System-wide power settings:"
  echo "Currently in use:"
  echo " standby              1"
  echo " lowpowermode         $STANDIN_LOW_POWER"
  echo " sleep                1"
fi
"""


@pytest.fixture
def standins(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("caffeinate", CAFFEINATE), ("pmset", PMSET)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "caffeinate.log"

    def env(power="AC Power", low_power="0", **extra):
        environ = clean_env(STANDIN_LOG=str(log), STANDIN_POWER=power, STANDIN_LOW_POWER=low_power, **extra)
        environ["PATH"] = f"{bin_dir}{os.pathsep}{environ['PATH']}"
        return environ

    return env, log


def _released(log, timeout=10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if any(line.startswith("released") for line in lines):
            return lines
        time.sleep(0.05)
    return log.read_text().splitlines() if log.exists() else []


def test_the_mac_is_held_awake_for_the_life_of_the_program_and_released_after(standins, tmp_path):
    env, log = standins
    report = tmp_path / "report.json"
    # The program prints its own pid: under the prefix it keeps the command's (exec), which caffeinate waits for.
    result = run([MPS_SHIM, "--simulate", "1", "--report", report, "bash", "-c", "echo $$; sleep 0.5"], env=env())
    assert result.returncode == 0, result.stderr
    pid = result.stdout.strip()
    lines = _released(log)
    assert lines[0] == f"start -i -s -w {pid}"  # idle and system sleep; never -d (display)
    assert lines[-1] == f"released {pid}"
    assert f"macOS sleep allowed -> prevented until process {pid} ends (caffeinate -i -s -w)" in result.stderr
    changes = [c for c in read_json(report)["changes"] if c["target"] == "macOS sleep"]
    assert len(changes) == 1 and changes[0]["to"].startswith(f"prevented until process {pid} ends")


def test_a_python_script_run_in_the_command_is_held_awake_too(standins, tmp_path):
    env, log = standins
    script = tmp_path / "train.py"
    script.write_text("import os\nprint(os.getpid())\n")
    result = run([MPS_SHIM, "--simulate", "1", script], env=env())
    assert result.returncode == 0, result.stderr
    pid = result.stdout.strip()
    lines = _released(log)
    assert lines[0] == f"start -i -s -w {pid}" and lines[-1] == f"released {pid}"


def test_battery_and_low_power_mode_are_named_at_the_start(standins):
    env, _ = standins
    result = run([MPS_SHIM, "--simulate", "1", "bash", "-c", "true"], env=env(power="Battery Power", low_power="1"))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith("mps-shim: this Mac is on battery power") for line in lines), result.stderr
    assert any(line.startswith("mps-shim: Low Power Mode is on") for line in lines), result.stderr
    plugged = run([MPS_SHIM, "--simulate", "1", "bash", "-c", "true"], env=env())
    assert "battery" not in plugged.stderr and "Low Power Mode" not in plugged.stderr


@pytest.mark.skipif(sys.platform == "darwin", reason="off macOS only")
def test_off_a_mac_nothing_is_held_and_nothing_is_asked(standins):
    env, log = standins
    result = run([MPS_SHIM, "bash", "-c", "true"], env=env(power="Battery Power", low_power="1"))
    assert result.returncode == 0
    assert not log.exists() and "battery" not in result.stderr


def test_mps_shim_plan_holds_nothing(standins, tmp_path):
    env, log = standins
    result = run([MPS_SHIM, "--simulate", "1", "plan", "bash", "-c", "true"], env=env())
    assert result.returncode == 0, result.stderr
    assert not log.exists()


def test_power_warnings_read_pmset_output():
    on_ac = "Now drawing from 'AC Power'\n -InternalBattery-0 (id=1)\t100%; charged; 0:00 remaining present: true\n"
    settings = textwrap.dedent("""\
        System-wide power settings:
        Currently in use:
         lowpowermode         0
         powermode            1
    """)
    assert power_warnings(on_ac, "lowpowermode 0\n") == []
    assert [w.split(":")[0] for w in power_warnings(on_ac, settings)] == ["Low Power Mode is on"]
    assert power_warnings(None, None) == []  # no pmset: nothing to say
