"""The shim's log lines (`mps-shim: ...` on stderr, on the standard `mps_shim` logger), with the logging module
imported only when the first line is written: importing it costs a process about 15 ms, and `import mps_shim` runs
at the start of every process of a shimmed environment, most of which never log a line."""
from __future__ import annotations

import sys

# logging's own values, so callers need not import it.
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
LEVELS = {"quiet": WARNING, "info": INFO, "debug": DEBUG}

_threshold = INFO


def set_level(name: str) -> None:
    """The level the `--log-level` option names; applied to the logger now if logging is loaded, else when it is."""
    global _threshold
    _threshold = LEVELS[name]
    if "logging" in sys.modules:
        _logger()


def emit(level: int, message: str, *args: object) -> None:
    if level >= _threshold:
        _logger().log(level, message, *args)


def _logger():
    import logging

    log = logging.getLogger("mps_shim")
    if not any(getattr(handler, "_mps_shim", False) for handler in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("mps-shim: %(message)s"))
        handler._mps_shim = True
        log.addHandler(handler)
        log.propagate = False  # records do not also go to the script's root handlers
    log.setLevel(_threshold)
    return log
