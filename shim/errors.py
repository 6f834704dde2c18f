"""The exceptions mps-shim raises, and the exit status each one stands for.

Library code only raises these. Two places turn them into one line on stderr and an exit status: the `mps-shim`
command (shim/cli.py) and the start-up hook of processes it launches or that run under MPS_SHIM=1 (shim/startup.py).
Under `import mps_shim` or `mps_shim.activate()` they stay ordinary exceptions, so a notebook kernel survives them.
"""
from __future__ import annotations


class ShimError(Exception):
    """Something mps-shim refuses to do; the message is the one line to print."""

    exit_status = 1


class ShimConfigError(ShimError, ValueError):
    """A bad option value: one line naming the option, the value and what is accepted."""

    exit_status = 2


class PlanError(ShimError, ValueError):
    """The run asks for something this device cannot do (e.g. a --precision it lacks): one line saying what and why."""

    exit_status = 2


class LaunchError(ShimError):
    """The program cannot be started: 127 when it is not found, 126 when it cannot be executed, as a shell says."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


class MemoryPlanError(ShimError, RuntimeError):
    """The run cannot fit in memory: raised before training, with the diagnosis as the message; nothing was written."""

    exit_status = 3


class PlanReached(BaseException):
    """`mps-shim plan`: training would start here, and the plan has been printed.

    A BaseException, like KeyboardInterrupt, so that a script's `except Exception` does not swallow the stop."""

    exit_status = 0
