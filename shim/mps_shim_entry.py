"""The entry module of the `mps-shim` command and of the MPS_SHIM start-up hook.

setup.py installs this file as the top-level module `mps_shim_entry`, beside the mps_shim package and the hook
mps_shim_hook.pth. Both entry points import it before the package: while it is in sys.modules, importing mps_shim
does not activate the shim, because the entry does, in its own way:

- the command (console script `mps-shim = mps_shim_entry:main`) with its options, which win over the environment,
  and a bad value as one line and exit status 2 (shim/cli.py);
- the hook (`MPS_SHIM=1`) with the environment's options, stopping the process with one line on a bad value
  (shim/startup.py).

It imports nothing itself, so the hook's line stays cheap.
"""


def main():
    from mps_shim.cli import main as command

    return command()
