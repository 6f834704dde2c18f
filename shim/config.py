"""The shim's options (interface.md section 3): parsing and validation, before any work starts.

Each option has an environment variable; a value given in Python (`activate(...)`) or on the command line wins.
A bad value raises ShimConfigError with one line naming the option, the value and what is accepted.
"""
from __future__ import annotations

import os
from collections import namedtuple

TYPE_CHECKING = False  # typing itself is not imported: `import mps_shim` runs at the start of every process
if TYPE_CHECKING:
    from typing import Mapping

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
LOG_LEVELS = ("quiet", "info", "debug")

# option name -> environment variable
ENV = {
    "precision": "MPS_SHIM_PRECISION",
    "memory_limit": "MPS_SHIM_MEMORY_LIMIT",
    "simulate": "MPS_SHIM_SIMULATE",
    "report": "MPS_SHIM_REPORT",
    "log_level": "MPS_SHIM_LOG_LEVEL",
}
SWITCH = "MPS_SHIM"
# Set by `mps-shim plan`: patched processes stop where training would start.
PLAN_ONLY = "MPS_SHIM_PLAN_ONLY"

_SIZE = r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$"
_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _UNITS[f"{_p}b"] = 1000**_i
    _UNITS[f"{_p}ib"] = 1024**_i


class ShimConfigError(ValueError):
    """A bad option value; the message is one line naming the option, the value and what is accepted."""


# Named tuples rather than dataclasses: this module is imported at the start of every shimmed process.
SimulationProfile = namedtuple("SimulationProfile", "macos torch memory_bytes")
SimulationProfile.__doc__ = "The Mac that MPS_SHIM_SIMULATE describes."

Options = namedtuple("Options", "precision memory_limit simulate report log_level", defaults=("auto", None, None, None, "info"))
Options.__doc__ = "The shim's options, resolved (interface.md section 3)."


def kill_switch(environ: Mapping[str, str] = os.environ) -> bool:
    """MPS_SHIM=0 turns everything off, even under `import mps_shim` or the prefix command."""
    return environ.get(SWITCH, "").strip() == "0"


def parse_size(value: str, source: str) -> int:
    """'12GiB', '12GB', '800MiB', '1.5GiB' or plain bytes -> bytes."""
    import re  # parsing happens only when a value is given; re is not imported on the hook's fast path

    match = re.match(_SIZE, str(value), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ShimConfigError(
            f"{source}={value!r} is not a size; use bytes or a number with KB/MB/GB/TB or KiB/MiB/GiB/TiB, e.g. 12GiB"
        )
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def _choice(value: str, source: str, choices: tuple[str, ...]) -> str:
    normalised = str(value).strip().lower()
    if normalised not in choices:
        raise ShimConfigError(f"{source}={value!r} is not accepted; use one of {', '.join(choices)}")
    return normalised


# `MPS_SHIM_SIMULATE=1`: a current Mac (documented in the README).
MODERN_MAC = {"macos": "15.1", "memory": "32GiB"}


def parse_simulation(value: str, source: str, installed_torch: str | None = None) -> SimulationProfile | None:
    """'macos=13.6,torch=2.2,memory=16GiB' (every key optional), '1' for a modern Mac, '' or '0' for off."""
    import re

    from mps_shim.capabilities import check_mac

    text = str(value).strip()
    if text in ("", "0"):
        return None
    fields = dict(MODERN_MAC)
    if text != "1":
        for item in text.split(","):
            key, sep, item_value = item.partition("=")
            key, item_value = key.strip().lower(), item_value.strip()
            if not sep or key not in ("macos", "torch", "memory") or not item_value:
                raise ShimConfigError(
                    f"{source}={value!r} is not a simulation profile; use '1' or comma-separated "
                    f"macos=X.Y, torch=X.Y, memory=SIZE, e.g. macos=13.6,torch=2.2,memory=16GiB"
                )
            fields[key] = item_value
    for key in ("macos", "torch"):
        if key in fields and not re.fullmatch(r"\d+(\.\d+){0,2}", fields[key]):
            raise ShimConfigError(f"{source}={value!r}: {key}={fields[key]!r} is not a version like 14.5")
    torch_version = fields.get("torch") or _release_of(installed_torch) or "2.13"
    memory = parse_size(fields["memory"], f"{source} memory")
    impossible = check_mac(torch_version, fields["macos"])
    if impossible:
        raise ShimConfigError(f"{source}={value!r} describes no real Mac: {impossible}")
    return SimulationProfile(macos=fields["macos"], torch=torch_version, memory_bytes=memory)


def _release_of(version: str | None) -> str | None:
    if not version:
        return None
    major, minor = version.split("+")[0].split(".")[:2]
    return f"{major}.{minor}"


def _installed_torch_version() -> str | None:
    # The simulated torch defaults to the installed one; read its metadata, never import it.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def parse_option(name: str, value, source: str):
    """Validate one option's raw value (a string from the environment or the CLI, or a Python value)."""
    if name == "precision":
        return _choice(value, source, PRECISIONS)
    if name == "log_level":
        return _choice(value, source, LOG_LEVELS)
    if name == "memory_limit":
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        return parse_size(value, source)
    if name == "simulate":
        if isinstance(value, SimulationProfile):
            return value
        if value is True:
            value = "1"
        return parse_simulation(value, source, _installed_torch_version())
    if name == "report":
        path = os.fspath(value)
        if not path.strip() or os.path.isdir(path):
            raise ShimConfigError(f"{source}={value!r} is not a file path; give the JSON file to write, e.g. report.json")
        return path
    raise ShimConfigError(f"unknown mps-shim option {name!r}; the options are {', '.join(ENV)}")


def load_options(environ: Mapping[str, str] = os.environ, **overrides) -> Options:
    """Options from the environment, with `overrides` (Python or CLI values, None = not given) winning."""
    options = Options()
    for name, variable in ENV.items():
        raw = environ.get(variable)
        if raw is not None and raw.strip() != "":
            options = options._replace(**{name: parse_option(name, raw, variable)})
    for name, value in overrides.items():
        if name not in ENV:
            raise ShimConfigError(f"unknown mps-shim option {name!r}; the options are {', '.join(ENV)}")
        if value is not None:
            options = options._replace(**{name: parse_option(name, value, name)})
    return options


def to_environ(options: Options) -> dict[str, str]:
    """The environment that makes a child process load the same options (used by the prefix command)."""
    environ = {SWITCH: "1", ENV["precision"]: options.precision, ENV["log_level"]: options.log_level}
    if options.memory_limit is not None:
        environ[ENV["memory_limit"]] = str(options.memory_limit)
    if options.simulate is not None:
        profile = options.simulate
        environ[ENV["simulate"]] = f"macos={profile.macos},torch={profile.torch},memory={profile.memory_bytes}"
    if options.report is not None:
        environ[ENV["report"]] = os.path.abspath(options.report)
    return environ
