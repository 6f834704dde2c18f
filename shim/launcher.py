"""Running the user's program under the shim (docs/user-contract.md, the prefix forms).

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
from mps_shim.errors import LaunchError

# What a shell exits with for a program it cannot find, and for one it finds but cannot execute.
NOT_FOUND = 127
CANNOT_EXECUTE = 126


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


def find_program(program: str) -> str:
    """The file that would run, found as a shell finds it; one line and a shell's exit status if there is none."""
    resolved = program if os.sep in program else shutil.which(program)
    if resolved is None or not os.path.exists(resolved):
        raise LaunchError(f"{program}: command not found", NOT_FOUND)
    if os.path.isdir(resolved):
        raise LaunchError(f"{program}: Is a directory", CANNOT_EXECUTE)
    if not os.access(resolved, os.X_OK):
        raise LaunchError(f"{program}: Permission denied", CANNOT_EXECUTE)
    return resolved


def exec_program(program: str, args: list[str]) -> None:
    """Replace this process with the program; its exit status and signals are then the user's directly."""
    resolved = find_program(program)
    try:
        os.execv(resolved, [program, *args])
    except OSError as error:  # e.g. a script whose #! names no interpreter, or a file that is no program
        raise LaunchError(f"{program}: {error.strerror}", CANNOT_EXECUTE) from None
