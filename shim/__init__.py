"""mps-shim: run unmodified Hugging Face Trainer + PEFT fine-tuning scripts on Apple-silicon Macs.

`import mps_shim` switches the shim on in this process, with the options of the environment (unless MPS_SHIM is
off); a bad value raises ShimConfigError. Importing it imports none of torch, transformers, accelerate or peft:
patches attach when their targets are imported.

The shim's own entry points, the `mps-shim` command and the MPS_SHIM start-up hook, import the module mps_shim_entry
(installed beside this package) before they import it: then activating is theirs, with the command's options or the
hook's way of stopping on a bad value (docs/user-contract.md, "Who switches it on").
"""
import sys

from mps_shim._version import __version__
from mps_shim.errors import ShimConfigError
from mps_shim.runtime import activate, deactivate, report

__all__ = ["__version__", "activate", "deactivate", "report", "ShimConfigError"]

if "mps_shim_entry" not in sys.modules:
    try:
        activate()
    except ShimConfigError as _error:
        raise _error.with_traceback(None) from None  # the message below names the setting to change
