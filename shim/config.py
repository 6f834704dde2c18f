"""The shim's options (docs/user-contract.md): parsing and validation, before any work starts.

Each option has an environment variable; a value given in Python (`activate(...)`) or on the command line wins, and
only the value that wins is judged: a bad variable that an option replaces does not matter.
A bad value raises ShimConfigError with one line naming where it came from, the value and what is accepted.
"""
from __future__ import annotations

import os
from collections import namedtuple

from mps_shim.errors import ShimConfigError

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
# The spellings of MPS_SHIM (and of MPS_SHIM_SIMULATE's on/off); shim/mps_shim_hook.pth repeats OFF to stay cheap.
ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off", "")
# Set by `mps-shim plan`: patched processes stop where training would start.
PLAN_ONLY = "MPS_SHIM_PLAN_ONLY"

_SIZE = r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$"
_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _UNITS[f"{_p}b"] = 1000**_i
    _UNITS[f"{_p}ib"] = 1024**_i
_SIZE_ACCEPTED = "use bytes or a number with KB/MB/GB/TB or KiB/MiB/GiB/TiB, e.g. 12GiB"


# Named tuples rather than dataclasses: this module is imported at the start of every shimmed process.
SimulationProfile = namedtuple("SimulationProfile", "macos torch memory_bytes graph_entry_bytes", defaults=(0,))
SimulationProfile.__doc__ = """The Mac that MPS_SHIM_SIMULATE describes. `graph_entry_bytes` (key `graph_entry`): the
driver memory of one cached MPS graph, 0 (not modelled) unless given (docs/mps-facts.md, "Long runs")."""

Options = namedtuple(
    "Options", "precision memory_limit simulate report log_level sources",
    defaults=("auto", None, None, None, "info", None),
)
Options.__doc__ = """The shim's options, resolved. `sources` maps each option to where its value came from: the
variable (MPS_SHIM_PRECISION), the command-line flag (--precision), the keyword of activate() (precision), or
"default"; a message about a value names that source (see `source_of`)."""


def source_of(options: Options, name: str) -> str:
    """Where the value of option `name` came from (the variable, the flag or the keyword), for messages."""
    return (options.sources or {}).get(name, "default")


def switch(environ: Mapping[str, str] = os.environ) -> bool | None:
    """MPS_SHIM: True (on), False (off: the kill switch) or None (not set). Any other spelling is refused."""
    value = environ.get(SWITCH)
    if value is None:
        return None
    normalised = value.strip().lower()
    if normalised in ON:
        return True
    if normalised in OFF:
        return False
    raise ShimConfigError(
        f"{SWITCH}={value!r} is neither on nor off; use 1, true, yes or on to switch the shim on, "
        "0, false, no, off or nothing to switch it off"
    )


def kill_switch(environ: Mapping[str, str] = os.environ) -> bool:
    """MPS_SHIM off (0, false, no, off, empty) turns everything off, even under `import mps_shim` or the prefix."""
    return switch(environ) is False


def parse_size(value, source: str) -> int:
    """'12GiB', '12GB', '800MiB', '1.5GiB' or plain bytes -> bytes; at least one byte."""
    import re  # parsing happens only when a value is given; re is not imported on the hook's fast path

    match = re.match(_SIZE, value, re.IGNORECASE) if isinstance(value, str) else None
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()]) if match else 0
    if size < 1:
        raise ShimConfigError(f"{source}={value!r} is not a size; {_SIZE_ACCEPTED}")
    return size


def _memory_limit(value, source: str) -> int:
    # A Python int of at least one byte is a size; anything else that is not text (0, True, 0.5) is refused by
    # parse_size with the same line as the text "0.5": one rule for every way in.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return parse_size(value, source)


def _choice(value, source: str, choices: tuple[str, ...]) -> str:
    normalised = value.strip().lower() if isinstance(value, str) else None
    if normalised not in choices:
        raise ShimConfigError(f"{source}={value!r} is not accepted; use one of {', '.join(choices)}")
    return normalised


# `MPS_SHIM_SIMULATE=1`: a current Mac (documented in docs/user-contract.md).
MODERN_MAC = {"macos": "15.1", "memory": "32GiB"}
_PROFILE_ACCEPTED = (
    "use '1' or comma-separated macos=X.Y, torch=X.Y, memory=SIZE, e.g. macos=13.6,torch=2.2,memory=16GiB"
)


def parse_simulation(value, source: str, installed_torch: str | None = None) -> SimulationProfile | None:
    """'macos=13.6,torch=2.2,memory=16GiB' (every key optional, each at most once), '1' (or another spelling of on)
    for a modern Mac, '0' (or another spelling of off) for none. Only a Mac that exists is accepted."""
    import re

    from mps_shim.capabilities import check_mac, mac_memory

    text = value.strip() if isinstance(value, str) else None
    if text is None:
        raise ShimConfigError(f"{source}={value!r} is not a simulation profile; {_PROFILE_ACCEPTED}")
    if text.lower() in OFF:
        return None
    given: dict[str, str] = {}
    if text.lower() not in ON:
        for item in text.split(","):
            key, sep, item_value = item.partition("=")
            key, item_value = key.strip().lower(), item_value.strip()
            if not sep or key not in ("macos", "torch", "memory", "graph_entry") or not item_value:
                raise ShimConfigError(f"{source}={value!r} is not a simulation profile; {_PROFILE_ACCEPTED}")
            if key in given:
                raise ShimConfigError(f"{source}={value!r} gives {key} twice; give each of macos, torch, memory once")
            given[key] = item_value
    for key in ("macos", "torch"):
        if key in given and not re.fullmatch(r"\d+(\.\d+){0,2}", given[key]):
            raise ShimConfigError(f"{source}={value!r}: {key}={given[key]!r} is not a version like 14.5")
    fields = {**MODERN_MAC, **given}
    if "torch" not in fields:
        fields["torch"] = _release_of(installed_torch) or "2.13"
        origin = f"the installed torch {installed_torch}" if installed_torch else "torch"
    else:
        origin = f"torch={fields['torch']}"
    memory = mac_memory(parse_size(fields["memory"], f"{source} memory"))  # memory=16GB: the 16 GB Mac, 16 GiB
    problem = _impossible_mac(fields["macos"], fields["torch"], origin, fields["memory"], memory) or check_mac(
        fields["torch"], fields["macos"]
    )
    if problem:
        raise ShimConfigError(f"{source}={value!r} describes no real Mac: {problem}")
    graph_entry = parse_size(given["graph_entry"], f"{source} graph_entry") if "graph_entry" in given else 0
    return SimulationProfile(macos=fields["macos"], torch=fields["torch"], memory_bytes=memory,
                             graph_entry_bytes=graph_entry)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _impossible_mac(macos: str, torch: str, torch_origin: str, memory_text: str, memory: int) -> str | None:
    """Why no Apple-silicon Mac with MPS has this macOS, torch or memory, or None (bounds in shim/capabilities.py)."""
    from mps_shim import capabilities as known

    major = _version_tuple(macos)[0]
    if major not in known.MACOS_MAJORS_WITH_MPS:
        majors = ", ".join(str(m) for m in known.MACOS_MAJORS_WITH_MPS)
        return f"macOS {macos} is not a macOS release that has MPS (those are {majors}; after 15 came 26)"
    release = _version_tuple(torch)[:2]
    if release < _version_tuple(known.SIMULATED_TORCH_OLDEST):
        return f"{torch_origin} is older than {known.SIMULATED_TORCH_OLDEST}, the oldest torch mps-shim supports"
    if release > _version_tuple(known.SIMULATED_TORCH_NEWEST):
        return (
            f"{torch_origin} is newer than {known.SIMULATED_TORCH_NEWEST}, the newest torch release mps-shim knows the "
            "MPS behaviour of"
        )
    if not known.MAC_MEMORY_SMALLEST <= memory <= known.MAC_MEMORY_LARGEST:
        return f"memory={memory_text}, but Apple-silicon Macs have 8 GB to 512 GB of unified memory"
    return None


def _release_of(version: str | None) -> str | None:
    if not version:
        return None
    major, minor = version.split("+")[0].split(".")[:2]
    return f"{major}.{minor}"


def _installed_torch_version() -> str | None:
    # The simulated torch defaults to the installed one; read its metadata, never import it.
    from mps_shim.versions import installed_version

    return installed_version("torch")


def _simulation(value, source: str):
    if isinstance(value, SimulationProfile):
        return value  # already parsed (the command hands its resolved options to activate())
    if isinstance(value, bool) or (type(value) is int and value in (0, 1)):  # Python's off/on, and 0/1 as ints
        value = "1" if value else "0"
    return parse_simulation(value, source, _installed_torch_version())


def _report_path(value, source: str) -> str:
    from mps_shim.report import unwritable

    try:
        path = os.fspath(value)
    except TypeError:
        path = None
    if not isinstance(path, str) or not path.strip() or os.path.isdir(path):
        raise ShimConfigError(f"{source}={value!r} is not a file path; give the JSON file to write, e.g. report.json")
    problem = unwritable(path)
    if problem:
        raise ShimConfigError(f"{source}={value!r} cannot be written: {problem}")
    return path


_PARSERS = {
    "precision": lambda value, source: _choice(value, source, PRECISIONS),
    "log_level": lambda value, source: _choice(value, source, LOG_LEVELS),
    "memory_limit": _memory_limit,
    "simulate": _simulation,
    "report": _report_path,
}


def parse_option(name: str, value, source: str):
    """Validate one option's value: a string from the environment or the command line, or a Python value."""
    if name not in _PARSERS:
        raise ShimConfigError(f"unknown mps-shim option {name!r}; the options are {', '.join(ENV)}")
    return _PARSERS[name](value, source)


def flag(name: str) -> str:
    """The command-line flag of an option: memory_limit -> --memory-limit."""
    return "--" + name.replace("_", "-")


def load_options(environ: Mapping[str, str] = os.environ, *, flags: bool = False, **overrides) -> Options:
    """Options from the environment, with `overrides` (None = not given) winning over it.

    Only the value that wins is judged, and a message names where it came from: the variable, or the override's
    flag (`flags=True`, the command line) or keyword (activate()).
    """
    unknown = sorted(set(overrides) - set(ENV))
    if unknown:
        raise ShimConfigError(f"unknown mps-shim option {unknown[0]!r}; the options are {', '.join(ENV)}")
    values, sources = {}, {}
    for name, variable in ENV.items():
        if overrides.get(name) is not None:
            value, source = overrides[name], flag(name) if flags else name
        elif (environ.get(variable) or "").strip():
            value, source = environ[variable], variable
        else:
            continue
        values[name], sources[name] = parse_option(name, value, source), source
    return Options(**values, sources=sources)


def _graph_entry_text(profile: SimulationProfile) -> str:
    return f",graph_entry={profile.graph_entry_bytes}" if profile.graph_entry_bytes else ""


def to_environ(options: Options) -> dict[str, str]:
    """The environment that makes a child process load the same options (used by the prefix command). Every
    variable is set, so a value the command line replaced or switched off does not reach the child; and every
    process the command starts belongs to one run, which writes one report (shim/report.py)."""
    from mps_shim.report import RUN_VARIABLE, new_run_id

    profile = options.simulate
    return {
        SWITCH: "1",
        RUN_VARIABLE: new_run_id(),
        ENV["precision"]: options.precision,
        ENV["log_level"]: options.log_level,
        ENV["memory_limit"]: "" if options.memory_limit is None else str(options.memory_limit),
        ENV["simulate"]: "0" if profile is None else f"macos={profile.macos},torch={profile.torch},"
        f"memory={profile.memory_bytes}" + _graph_entry_text(profile),
        ENV["report"]: "" if options.report is None else os.path.abspath(options.report),
    }
