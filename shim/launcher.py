"""Running the user's program under the shim (interface.md section 1, the prefix forms).

A Python script (`mps-shim train.py ...`) runs in this process, exactly as `python train.py ...` would: same
`sys.argv[1:]`, `__name__ == "__main__"`, the script's folder first on `sys.path`. Anything else (`bash run_sft.sh`,
`torchrun ...`, `python -m pkg`, `accelerate launch ...`) replaces this process, with the environment set so every
Python process it starts activates the shim through the start-up hook; this environment's `bin` comes first on PATH
so that `python` and `torchrun` inside a shell script are the ones that have the shim installed.
"""
from __future__ import annotations

import os
import runpy
import shutil
import sys

from mps_shim.config import Options, to_environ


class LaunchError(Exception):
    """The program cannot be started; the message is the one line to print."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def prepare_environment(options: Options) -> None:
    os.environ.update(to_environ(options))
    interpreter_bin = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != interpreter_bin:
        os.environ["PATH"] = interpreter_bin + (os.pathsep + path if path else "")


def is_python_script(program: str) -> bool:
    return program.endswith(".py") or program.endswith(".pyw")


def run_script(path: str, args: list[str]) -> None:
    """Run a Python script in this process as the interpreter would run it as __main__."""
    if not os.path.isfile(path):
        raise LaunchError(f"can't open file {path!r}: no such file", 2)  # what python itself exits with
    sys.argv = [path, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(path))
    runpy.run_path(path, run_name="__main__")


def exec_program(program: str, args: list[str]) -> None:
    """Replace this process with the program; its exit status and signals are then the user's directly."""
    resolved = program if os.sep in program else shutil.which(program)
    if resolved is None or not os.path.exists(resolved):
        raise LaunchError(f"{program}: command not found", 127)  # what a shell exits with
    os.execv(resolved, [program, *args])
