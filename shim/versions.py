"""Which version of a library is here, and whether mps-shim was tested with it: the one version helper of the shim.

Cheap to import: `import mps_shim` runs at the start of every process, so nothing here imports torch or transformers,
and `importlib.metadata` and `packaging` are imported inside the functions that need them.

Two questions have two answers:
- `installed_version("peft")`: the version of the installed distribution (what pip would report);
- `module_version(peft)`: the version of the module that was actually imported, which is a different thing when a
  script ships its own copy of a library (a `peft/` folder next to the script is imported before the installed one).

Two kinds of comparison:
- `version_matches("4.35.0", ">=4.40,<5.25")`: PEP 440 specifier semantics, pre-releases allowed (`<5.25` excludes
  5.25.0.dev0, a pre-release of the excluded version, as PEP 440 says);
- `compare("5.0.0.dev0", "<", "5.0.0")`: plain ordering of two versions (True: a pre-release sorts before its release).
A version that is None (not installed) or not a PEP 440 version matches no specifier and compares False.
"""
from __future__ import annotations

import functools
import os
import sys

TYPE_CHECKING = False  # typing itself is not imported: this module is imported at the start of every process
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Iterable, Mapping

# The versions the stacks in stacks/*.txt test, by distribution: the single source of the `stack` extra in
# pyproject.toml (tests/test_versions.py checks they agree).
# - transformers 4.40.2 (upstream) and 5.24.0 (requirements, current);
# - peft 0.7.1 (upstream, requirements) and 0.21.2 (current);
# - accelerate 0.30.1 (upstream) and 1.15.0 (requirements, current);
# - torch: every stack computes with 2.13.0; the MPS behaviour of torch 2.2 and later is what the capability table
#   (capabilities.py) and the simulated Apple GPU cover, so 2.2 is the floor.
TESTED_RANGES = {
    "torch": ">=2.2,<2.14",
    "transformers": ">=4.40,<5.25",
    "accelerate": ">=0.30,<1.16",
    "peft": ">=0.7.1,<0.22",
}

OPERATORS = ("<", "<=", "==", "!=", ">=", ">")


@functools.lru_cache(maxsize=None)
def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution (`installed_version("transformers")`), or None if it is not installed.

    Cached: call `clear_caches()` after installing or removing a package in this process.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def module_version(module: ModuleType | str) -> str | None:
    """The version of the module actually imported (a module or the name of one already imported), or None.

    The top-level package's `__version__` when it has one (a vendored copy then gives its own version). Otherwise the
    version of the installed distribution that ships the module's file; a module loaded from anywhere else (a copy
    beside the script, a source checkout) has no version we can vouch for: None.
    """
    if isinstance(module, str):
        module = sys.modules.get(module)
        if module is None:
            return None
    top_name = module.__name__.partition(".")[0]
    top = sys.modules.get(top_name, module)
    # Read from the module's namespace, not through getattr: a module-level __getattr__ (click 8.2) may warn or
    # compute the installed distribution's version, which is not necessarily the imported module's.
    version = getattr(top, "__dict__", {}).get("__version__")
    if isinstance(version, str) and version:
        return str(version)  # str(): torch's TorchVersion is a str subclass
    path = getattr(module, "__file__", None) or getattr(top, "__file__", None)
    if not path:
        return None
    for distribution in _distributions_of(top_name):
        if _ships_file(distribution, path):
            return installed_version(distribution)
    return None


def _distributions_of(top_name: str):
    """Installed distributions that may ship the top-level package `top_name`: the one of the same name first (the
    usual case, cheap), then the others that declare it (this reads every distribution's metadata once)."""
    if installed_version(top_name) is not None:
        yield top_name
    same = top_name.lower().replace("_", "-")
    for name in _top_level_owners().get(top_name, ()):
        if name.lower().replace("_", "-").replace(".", "-") != same:
            yield name


@functools.lru_cache(maxsize=1)
def _top_level_owners() -> dict[str, list[str]]:
    from importlib.metadata import packages_distributions

    return packages_distributions()


@functools.lru_cache(maxsize=None)
def _installed_files(distribution: str) -> tuple[str, frozenset[str]]:
    """Where a distribution is installed and the files its RECORD lists there, as paths relative to it."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import distribution as find

    try:
        found = find(distribution)
    except PackageNotFoundError:
        return "", frozenset()
    base = os.path.realpath(found.locate_file(""))
    files = frozenset(os.path.normpath(str(file)) for file in found.files or ())
    return base, files


def _ships_file(distribution: str, path: str) -> bool:
    """Whether `path` is one of the files installed with `distribution` (an editable install lists none of its
    sources, so its modules are not vouched for this way)."""
    base, files = _installed_files(distribution)
    if not files:
        return False
    return os.path.relpath(os.path.realpath(path), base) in files


def clear_caches() -> None:
    """Forget what was read of the installed distributions (after a package was installed or removed)."""
    for cached in (installed_version, _top_level_owners, _installed_files):
        cached.cache_clear()


def _parse(version: str | None):
    if version is None:
        return None
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(version))
    except InvalidVersion:
        return None


def version_matches(version: str | None, specifier: str) -> bool:
    """Whether `version` satisfies a PEP 440 specifier such as ">=4.40,<5.25", pre-releases allowed.

    False for None or a version that is not PEP 440. A malformed specifier raises packaging's InvalidSpecifier.
    """
    from packaging.specifiers import SpecifierSet

    specifiers = SpecifierSet(specifier, prereleases=True)
    parsed = _parse(version)
    return parsed is not None and specifiers.contains(parsed)


def compare(version: str | None, operator: str, other: str) -> bool:
    """`version OPERATOR other` in PEP 440 ordering, e.g. compare(installed_version("torch"), ">=", "2.5").

    Local labels count as PEP 440 orders them ("2.13.0+cpu" > "2.13.0"); use `version_matches` with "==2.13.0" to
    ignore them. False for None or a version that is not PEP 440. An unknown operator raises ValueError.
    """
    if operator not in OPERATORS:
        raise ValueError(f"operator {operator!r} is not one of {', '.join(OPERATORS)}")
    left, right = _parse(version), _parse(other)
    if left is None:
        return False
    if right is None:
        raise ValueError(f"{other!r} is not a PEP 440 version")
    return {
        "<": left < right, "<=": left <= right, "==": left == right,
        "!=": left != right, ">=": left >= right, ">": left > right,
    }[operator]


def in_tested_range(distribution: str, version: str | None) -> bool | None:
    """Whether `version` of `distribution` lies in its tested range; None when mps-shim declares no range for it."""
    specifier = TESTED_RANGES.get(distribution)
    if specifier is None:
        return None
    return version_matches(version, specifier)


def out_of_range_line(distribution: str, version: str | None) -> str | None:
    """The one line naming `distribution` at `version` outside its tested range; None when in range, not installed
    (version None) or without a declared range."""
    if version is None or in_tested_range(distribution, version) is not False:
        return None
    return (
        f"{distribution} {version} is outside mps-shim's tested range ({TESTED_RANGES[distribution]}): "
        "patches still apply where their targets are found"
    )


def out_of_range_lines(versions: Mapping[str, str | None] | Iterable[tuple[str, str | None]]) -> list[str]:
    """For versions found (distribution -> version, None for not installed), one line per library outside its tested
    range, in the order given. Pure: asks nothing of the environment."""
    pairs = versions.items() if hasattr(versions, "items") else versions
    lines = (out_of_range_line(distribution, version) for distribution, version in pairs)
    return [line for line in lines if line is not None]
