"""The MPS_SHIM start-up hook: switches the shim on in a Python process as it starts.

mps_shim_hook.pth imports mps_shim_entry (so the package leaves activation to us) and then this module, in every
Python process of an environment where mps-shim is installed, unless MPS_SHIM is unset or off. Importing it:

- activates the shim with the environment's options; a bad MPS_SHIM or option value stops the process here with
  one line on stderr and the exit status of its exception (shim/errors.py), before the program runs;
- installs a sys.excepthook that does the same for the shim's exceptions the program meets later (a --precision
  the Mac cannot run, a run that cannot fit in memory, `mps-shim plan` reaching training); every other exception
  goes to the hook that was there before.

The `mps-shim` command maps the same exceptions the same way in its own process (shim/cli.py).
"""
import os
import sys

from mps_shim.errors import PlanReached, ShimError

_previous_excepthook = sys.excepthook


def _say(error: BaseException) -> None:
    text = str(error)
    if text:
        sys.stderr.write(f"mps-shim: {text}\n")
    sys.stderr.flush()


def _excepthook(kind, error, traceback) -> None:
    if isinstance(error, (ShimError, PlanReached)):
        _say(error)
        sys.exit(error.exit_status)  # from an excepthook, SystemExit ends the process with this status
    _previous_excepthook(kind, error, traceback)


def _start() -> None:
    from mps_shim.config import switch
    from mps_shim.runtime import activate

    try:
        if switch():
            activate()
    except ShimError as error:
        _say(error)
        sys.stdout.flush()
        # site.py prints an exception from a .pth line and carries on without the shim, and takes SystemExit for a
        # fatal error of its own: ending the process is the only way to stop before the program runs.
        os._exit(error.exit_status)
    sys.excepthook = _excepthook


_start()
