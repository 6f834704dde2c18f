"""shim/versions.py: installed and imported versions, PEP 440 comparisons, the tested ranges and their lines.

Real distributions and modules of this stack, and real folders in tmp: a stand-in distribution with its dist-info,
and vendored package folders beside a script, imported the way Python imports them for that script.
"""
from __future__ import annotations

import json
import re
import sys
import tomllib

import packaging
import packaging.version
import pytest
import typing_extensions
from packaging.requirements import Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from mps_shim.versions import (
    TESTED_RANGES,
    clear_caches,
    compare,
    in_tested_range,
    installed_version,
    module_version,
    out_of_range_line,
    out_of_range_lines,
    version_matches,
)
from support import MPS_SHIM, REPO, clean_env, python, run

STACKS = ("upstream", "requirements", "current")


def pins(stack: str) -> dict[str, str]:
    found = {}
    for line in (REPO / "stacks" / f"{stack}.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==")
            found[name.strip().lower()] = version.strip()
    return found


# --- the tested ranges: one source, and what the stacks really test


def test_the_stack_extra_of_pyproject_declares_exactly_the_tested_ranges():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extra = {Requirement(line).name: Requirement(line).specifier for line in project["optional-dependencies"]["stack"]}
    assert extra == {name: SpecifierSet(spec) for name, spec in TESTED_RANGES.items()}
    # and none of the patched libraries is a hard dependency: `pip install mps-shim` never moves them
    hard = {Requirement(line).name for line in project["dependencies"]}
    assert hard.isdisjoint(TESTED_RANGES), hard
    assert {"wrapt", "click", "psutil", "packaging"} <= hard  # what the shim imports whatever the stack


@pytest.mark.parametrize("stack", STACKS)
def test_every_stack_pins_versions_inside_the_tested_ranges(stack):
    pinned = pins(stack)
    for name in TESTED_RANGES:
        assert in_tested_range(name, pinned[name]) is True, (stack, name, pinned[name])


def test_each_range_ends_below_the_next_minor_release_after_the_newest_tested():
    for name, spec in TESTED_RANGES.items():
        newest = max(packaging.version.Version(pins(stack)[name]) for stack in STACKS)
        assert not version_matches(f"{newest.major}.{newest.minor + 1}.0", spec), name
        assert version_matches(f"{newest.major}.{newest.minor}.{newest.micro + 1}", spec), name  # a bug-fix release
        oldest = min(packaging.version.Version(pins(stack)[name]) for stack in STACKS)
        assert version_matches(str(oldest), spec), name


def test_the_previous_stack_is_below_the_ranges_of_what_it_pins():
    pinned = pins("previous")
    assert [line.split()[0] for line in out_of_range_lines(pinned)] == ["transformers", "accelerate", "peft"]
    assert in_tested_range("torch", pinned["torch"]) is True


# --- installed_version


def test_installed_version_is_the_distributions_and_none_when_absent():
    assert installed_version("packaging") == packaging.__version__
    assert installed_version("mps-shim-no-such-distribution") is None
    assert installed_version("torch").startswith("2.13")


def test_installed_version_is_cached_until_cleared():
    clear_caches()
    installed_version("packaging")
    installed_version("packaging")
    assert installed_version.cache_info().hits >= 1
    clear_caches()
    assert installed_version.cache_info().currsize == 0


# --- module_version: the module actually imported


def test_module_version_of_an_installed_package_and_its_submodules():
    assert module_version(packaging) == packaging.__version__
    assert module_version(packaging.version) == packaging.__version__  # a submodule: its top-level package's
    assert module_version("packaging.version") == packaging.__version__  # by the name of an imported module
    assert module_version("mps_shim_no_such_module") is None  # a name not imported is not imported for it


def test_module_version_without_dunder_version_comes_from_the_distribution_that_ships_the_file():
    assert "__version__" not in vars(typing_extensions)  # the case under test: only the RECORD can tell
    assert module_version(typing_extensions) == installed_version("typing_extensions") is not None


def standin_distribution(site, version="1.2.3"):
    """A real installed distribution `standin_pkg` in folder `site`: the package and a dist-info with its RECORD."""
    package = site / "standin_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("VALUE = 'installed'\n")
    info = site / f"standin_pkg-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: standin-pkg\nVersion: {version}\n")
    (info / "top_level.txt").write_text("standin_pkg\n")
    (info / "RECORD").write_text(
        f"standin_pkg/__init__.py,,\nstandin_pkg-{version}.dist-info/METADATA,,\n"
        f"standin_pkg-{version}.dist-info/top_level.txt,,\nstandin_pkg-{version}.dist-info/RECORD,,\n"
    )
    return site


PROBE = (
    "import json, {name}\n"
    "from mps_shim.versions import installed_version, module_version\n"
    "print(json.dumps([{name}.__file__, module_version({name}), installed_version({distribution!r})]))\n"
)


def run_script_beside(folder, name, distribution, **env):
    """A script in `folder` that imports `name`, run as `python script.py`: its folder comes first on sys.path."""
    script = folder / "probe.py"
    script.write_text(PROBE.format(name=name, distribution=distribution))
    result = run([sys.executable, script], env=clean_env(MPS_SHIM="0", **env), check=True, timeout=300)
    return json.loads(result.stdout.splitlines()[-1])


def test_a_distribution_without_dunder_version_is_read_from_its_record(tmp_path):
    site = standin_distribution(tmp_path / "site")
    script_dir = tmp_path / "script"
    script_dir.mkdir()
    path, imported, installed = run_script_beside(script_dir, "standin_pkg", "standin-pkg", PYTHONPATH=str(site))
    assert path == str(site / "standin_pkg" / "__init__.py")
    assert imported == installed == "1.2.3"


def test_a_vendored_copy_without_dunder_version_is_not_the_installed_distribution(tmp_path):
    site = standin_distribution(tmp_path / "site")
    script_dir = tmp_path / "script"
    (script_dir / "standin_pkg").mkdir(parents=True)
    (script_dir / "standin_pkg" / "__init__.py").write_text("VALUE = 'vendored'\n")
    path, imported, installed = run_script_beside(script_dir, "standin_pkg", "standin-pkg", PYTHONPATH=str(site))
    assert path == str(script_dir / "standin_pkg" / "__init__.py")  # the script's own copy won
    assert installed == "1.2.3"
    assert imported is None  # its file is not among the installed distribution's: no version to vouch for


def test_a_vendored_peft_beside_the_script_is_not_the_installed_peft(tmp_path):
    vendored = tmp_path / "peft"
    vendored.mkdir()
    (vendored / "__init__.py").write_text("# a copy of a library kept in a script's folder, without __version__\n")
    path, imported, installed = run_script_beside(tmp_path, "peft", "peft")
    assert path == str(vendored / "__init__.py")
    assert installed == installed_version("peft") is not None
    assert imported is None

    (vendored / "__init__.py").write_text("__version__ = '0.5.0.dev0'\n")
    path, imported, installed = run_script_beside(tmp_path, "peft", "peft")
    assert (imported, installed) == ("0.5.0.dev0", installed_version("peft"))


def test_the_installed_peft_imported_for_real_has_its_distributions_version(tmp_path):
    path, imported, installed = run_script_beside(tmp_path, "peft", "peft")
    assert "site-packages" in path
    assert imported == installed == installed_version("peft")


# --- comparisons


@pytest.mark.parametrize(
    "version, specifier, expected",
    [
        ("4.35.0", ">=4.40,<5.25", False),
        ("4.40.2", ">=4.40,<5.25", True),
        ("5.24.0", ">=4.40,<5.25", True),
        ("5.25.0", ">=4.40,<5.25", False),
        ("5.0.0rc1", ">=4.40,<5.25", True),  # pre-releases are allowed
        ("5.25.0.dev0", ">=4.40,<5.25", False),  # PEP 440: `<5.25` excludes 5.25's own pre-releases
        ("2.13.0+cpu", ">=2.2,<2.14", True),  # a local label
        ("2.13.0+cpu", "==2.13.0", True),  # == ignores the local label
        ("0.7.0", ">=0.7.1,<0.22", False),
        ("not a version", ">=0", False),
        (None, ">=0", False),
    ],
)
def test_version_matches(version, specifier, expected):
    assert version_matches(version, specifier) is expected


def test_version_matches_refuses_a_malformed_specifier():
    with pytest.raises(InvalidSpecifier):
        version_matches("1.0", "at least 1")


def test_compare_orders_versions_as_pep_440_does():
    assert compare("5.0.0.dev0", "<", "5.0.0")  # a pre-release sorts before its release (unlike `<5.0.0` specifier)
    assert not version_matches("5.0.0.dev0", "<5.0.0")
    assert compare("4.40.2", ">=", "4.40") and compare("4.40.2", "!=", "4.40")
    assert compare("2.13.0+cpu", ">", "2.13.0") and not compare("2.13.0+cpu", "==", "2.13.0")
    assert compare("0.21.2", "==", "0.21.2.0") and compare("1.10", ">", "1.9")
    assert compare(None, ">=", "0") is False and compare("x.y", "<", "1") is False
    with pytest.raises(ValueError, match="operator '=>' is not one of"):
        compare("1.0", "=>", "1.0")
    with pytest.raises(ValueError, match="'soon' is not a PEP 440 version"):
        compare("1.0", "<", "soon")


# --- the lines for versions outside the tested ranges


def test_out_of_range_lines_names_each_library_outside_its_range_once_in_order():
    found = {
        "torch": "2.13.0+cpu",  # in range
        "transformers": "4.35.0",
        "accelerate": None,  # not installed: nothing to say
        "peft": "0.22.0",
        "datasets": "1.0.0",  # no range declared
    }
    assert out_of_range_lines(found) == [
        "transformers 4.35.0 is outside mps-shim's tested range (>=4.40,<5.25): "
        "patches still apply where their targets are found",
        "peft 0.22.0 is outside mps-shim's tested range (>=0.7.1,<0.22): "
        "patches still apply where their targets are found",
    ]
    assert out_of_range_lines([("accelerate", "0.24.1"), ("torch", "2.1.2")]) == [
        out_of_range_line("accelerate", "0.24.1"),
        out_of_range_line("torch", "2.1.2"),
    ]
    assert out_of_range_lines({name: spec.split(",")[0][2:] for name, spec in TESTED_RANGES.items()}) == []


def test_an_unreadable_version_is_outside_and_an_unknown_library_has_no_range():
    assert out_of_range_line("transformers", "custom-build") == (
        "transformers custom-build is outside mps-shim's tested range (>=4.40,<5.25): "
        "patches still apply where their targets are found"
    )
    assert in_tested_range("datasets", "2.19.1") is None
    assert out_of_range_line("datasets", "0.0.1") is None


def test_this_stack_is_inside_every_tested_range():
    found = {name: installed_version(name) for name in TESTED_RANGES}
    assert out_of_range_lines(found) == [], found


# --- cheap to import, and what doctor shows


def test_importing_versions_imports_nothing_beyond_what_is_already_loaded():
    code = (
        "import sys\n"
        "import mps_shim\n"
        "before = set(sys.modules)\n"
        "import mps_shim.versions\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    result = python(code, env=clean_env(MPS_SHIM="0"), check=True)
    assert result.stdout.strip() == "['mps_shim.versions']"


def test_doctor_shows_the_tested_ranges_and_names_nothing_on_this_stack():
    env = clean_env(MPS_SHIM_SIMULATE="macos=15.1,torch=2.13")
    findings = json.loads(run([MPS_SHIM, "doctor", "--json"], env=env, check=True, timeout=300).stdout)
    assert findings["tested_ranges"] == TESTED_RANGES
    assert findings["outside_tested_range"] == []
    assert findings["libraries"]["transformers"] == installed_version("transformers")
    text = run([MPS_SHIM, "doctor"], env=env, check=True, timeout=300).stdout
    assert not re.search("outside mps-shim's tested range", text)
