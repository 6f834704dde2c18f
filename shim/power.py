"""A long run on a Mac: the Mac does not sleep under it, and a Mac that will run slowly is named at the start.

On macOS (or a simulated Mac) the prefix command (`mps-shim PROGRAM ...`) calls `prepare_long_run` just before the
program starts:

* It starts `caffeinate -i -s -w PID`, PID being the program's process (the command's own: a Python script runs in it,
  anything else replaces it with exec, keeping the PID). caffeinate holds the power assertions against idle sleep
  (-i) and, on AC power, system sleep (-s) until that process ends, then exits, so the assertion never outlives the
  run. It runs in its own session, so Ctrl-C reaches the program and not it. Not -d: keeping the display on as well
  made GPU watchdog resets more likely in reports (docs/mps-facts.md, "Long runs").
* It asks `pmset -g batt` (on battery: "Now drawing from 'Battery Power'") and `pmset -g` (Low Power Mode:
  "lowpowermode 1", or "powermode 1" where macOS has power modes) and warns for each: reports put the cost at about
  40% of the speed.

A missing `caffeinate` or `pmset` is one line, never a failure. Library code: it reports, the command prints.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from mps_shim.log import DEBUG, WARNING

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from mps_shim.report import Report

CAFFEINATE_FLAGS = ("-i", "-s")  # idle sleep, system sleep on AC; never -d (display)
_LOW_POWER = re.compile(r"^\s*(?:lowpowermode|powermode)\s+1\s*$", re.M)
_ON_BATTERY = re.compile(r"Now drawing from 'Battery Power'")


def is_macos(simulated: bool) -> bool:
    """Where power matters: macOS, or a simulated Mac (which stands for one, stand-in commands included)."""
    return simulated or sys.platform == "darwin"


def _output(command: list[str]) -> str | None:
    """A command's standard output, or None when it is missing or fails."""
    executable = shutil.which(command[0])
    if executable is None:
        return None
    try:
        result = subprocess.run([executable, *command[1:]], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def power_warnings(battery: str | None, settings: str | None) -> list[str]:
    """What in `pmset -g batt` and `pmset -g` output slows a long run (pure)."""
    found = []
    if battery is not None and _ON_BATTERY.search(battery):
        found.append("this Mac is on battery power: a long run is slower (about 40% in reports) and stops when the "
                     "battery runs out; plug it in")
    if settings is not None and _LOW_POWER.search(settings):
        found.append("Low Power Mode is on: the GPU runs slower (about 40% in reports); turn it off in System "
                     "Settings > Battery for the run")
    return found


def keep_awake(pid: int) -> subprocess.Popen | None:
    """Start `caffeinate -i -s -w pid`; None when there is no caffeinate."""
    executable = shutil.which("caffeinate")
    if executable is None:
        return None
    return subprocess.Popen(
        [executable, *CAFFEINATE_FLAGS, "-w", str(pid)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )


def prepare_long_run(report: Report, simulated: bool, pid: int | None = None) -> Any:
    """Before the program starts: warn about battery and Low Power Mode, and hold the Mac awake for the life of
    process `pid` (this one by default). Returns the caffeinate process, or None."""
    if not is_macos(simulated):
        return None
    for line in power_warnings(_output(["pmset", "-g", "batt"]), _output(["pmset", "-g"])):
        report.note(line, WARNING)
    pid = os.getpid() if pid is None else pid
    holder = keep_awake(pid)
    if holder is None:
        # Every Mac has /usr/bin/caffeinate; a simulated Mac usually has none, which is only worth a debug line.
        report.note("caffeinate not found: nothing keeps this Mac from sleeping during the run",
                    DEBUG if simulated else WARNING)
        return None
    report.change(
        "macOS sleep", "allowed", f"prevented until process {pid} ends (caffeinate {' '.join(CAFFEINATE_FLAGS)} -w)",
        "a Mac that sleeps stops the run; the display may still sleep (-d keeps it on and made GPU watchdog resets "
        "more likely)",
    )
    return holder
