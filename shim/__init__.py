"""mps-shim: run unmodified Hugging Face Trainer + PEFT fine-tuning scripts on Apple-silicon Macs.

`import mps_shim` switches the shim on in this process (unless MPS_SHIM=0). Importing it imports none of torch,
transformers, accelerate or peft: patches attach when their targets are imported.
"""
import os
import sys

from mps_shim._version import __version__
from mps_shim.config import ShimConfigError
from mps_shim.runtime import activate, deactivate, report

__all__ = ["__version__", "activate", "deactivate", "report", "ShimConfigError"]


def _started_by_cli() -> bool:
    # The `mps-shim` command activates with its own options (which win over the environment) and reports a bad
    # value as one line with exit status 2, so importing the package on its behalf must not activate first.
    return os.path.basename(sys.argv[0] if sys.argv else "").startswith("mps-shim")


def _imported_by_startup_hook() -> bool:
    """Whether site.py is importing us from mps_shim_hook.pth (MPS_SHIM=1 in the environment)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "addpackage" and frame.f_globals.get("__name__") == "site":
            return True
        frame = frame.f_back
    return False


if not _started_by_cli():
    try:
        activate()
    except ShimConfigError as error:
        if not _imported_by_startup_hook():
            raise
        # site.py would print a traceback and carry on without the shim, and SystemExit there is a fatal error with a
        # page of traceback: a bad option must stop the process with its one line.
        sys.stderr.write(f"mps-shim: {error}\n")
        sys.stderr.flush()
        os._exit(2)
