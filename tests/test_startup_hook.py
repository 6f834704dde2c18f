"""The `MPS_SHIM=1` start-up hook (docs/user-contract.md) after `pip install .` and after `pip install -e .`.

A full venv with torch takes minutes to build, so each test builds a bare one (`venv --without-pip`) whose
site-packages holds one .pth line pointing at this stack's site-packages: the shim's dependencies import from there,
but the stack's own .pth files (its editable mps-shim and its hook) are not processed, because site.py reads .pth
files only in site directories, not in folders a .pth line adds. mps-shim is then installed into the bare venv with
this stack's pip (`pip --python`), from a copy of the source so the repository gets no build/ or egg-info from us.
If that cannot be done offline the tests skip and say why; they never pass without having run.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.version import Version

from support import REPO, clean_env, run

STACK_SITE_PACKAGES = sysconfig.get_paths()["purelib"]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "shim", "patches")
PROBE = "import sys; m = sys.modules.get('mps_shim'); print(m is not None, m and m.__file__, m and m.report()['active'])"


def bare_venv(folder: Path) -> Path:
    """A venv without pip whose packages come from this stack's site-packages (its .pth files unprocessed)."""
    run([sys.executable, "-m", "venv", "--without-pip", folder], check=True, timeout=120)
    interpreter = folder / "bin" / "python"
    site_packages = run(
        [interpreter, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True
    ).stdout.strip()
    # "_" sorts before "m": this line is on sys.path before the hook's .pth imports mps_shim.
    (Path(site_packages) / "_mps_shim_test_stack.pth").write_text(STACK_SITE_PACKAGES + "\n")
    return interpreter


def source_copy(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.exists():
            shutil.copy2(source, folder / name)
        else:  # README.md is read by the build (pyproject's readme); only its existence matters here
            (folder / name).write_text("mps-shim\n")
    return folder


def pip_install(interpreter: Path, project: Path, editable: bool) -> None:
    """Install mps-shim into the bare venv offline, or skip the test saying why."""
    pip = run([sys.executable, "-m", "pip", "--version"], timeout=120)
    if pip.returncode != 0:
        pytest.skip(f"this stack has no pip: {pip.stderr.strip()[-300:]}")
    version = Version(pip.stdout.split()[1])
    if version < Version("22.3"):
        pytest.skip(f"pip {version} has no --python option (needs pip 22.3+)")
    target = ["-e", str(project)] if editable else [str(project)]
    base = [sys.executable, "-m", "pip", "--python", interpreter, "install", "--no-deps", "--no-input", "-q"]
    attempts = []
    # Without build isolation the stack's own setuptools builds (setuptools >= 70.1 builds wheels without the
    # `wheel` package); with it, pip fetches setuptools and wheel from this machine's configured local index.
    for isolation in (["--no-build-isolation"], []):
        result = run([*base, *isolation, *target], env=clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1"), timeout=300)
        if result.returncode == 0:
            return
        attempts.append(f"{' '.join(isolation) or 'with build isolation'}: {result.stderr.strip()[-600:]}")
    pytest.skip("cannot install mps-shim offline into a bare venv:\n" + "\n".join(attempts))


def probe(interpreter: Path, **environ: str) -> tuple[bool, str | None, bool | None]:
    env = clean_env(**environ)
    env.pop("PYTHONPATH", None)
    out = run([interpreter, "-c", PROBE], env=env, check=True, timeout=120).stdout.split()
    loaded = out[0] == "True"
    return loaded, (out[1] if loaded else None), (out[2] == "True" if loaded else None)


def test_a_bare_venv_without_mps_shim_does_not_start_it(tmp_path):
    # The control: the stack's own hook and editable install are on sys.path but not processed, so whatever the
    # installed venvs below do comes from what pip installed there.
    interpreter = bare_venv(tmp_path / "venv")
    assert probe(interpreter, MPS_SHIM="1") == (False, None, None)
    found = run([interpreter, "-c", "import click, wrapt, packaging, psutil; print('ok')"], check=True)
    assert found.stdout.strip() == "ok"


@pytest.mark.parametrize("editable", [False, True], ids=["pip install .", "pip install -e ."])
def test_startup_hook_after_install(tmp_path, editable):
    interpreter = bare_venv(tmp_path / "venv")
    project = source_copy(tmp_path / "project")
    pip_install(interpreter, project, editable)

    site_packages = Path(
        run([interpreter, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True).stdout.strip()
    )
    assert (site_packages / "mps_shim_hook.pth").is_file(), sorted(p.name for p in site_packages.iterdir())
    # the module the hook and the command import before the package, installed beside it
    assert (site_packages / "mps_shim_entry.py").is_file(), sorted(p.name for p in site_packages.iterdir())

    loaded, where, active = probe(interpreter, MPS_SHIM="1")
    assert loaded and active
    expected_home = project / "shim" if editable else site_packages / "mps_shim"
    assert Path(where).resolve().parent == expected_home.resolve(), where

    assert probe(interpreter) == (False, None, None)
    for off in ("0", "", "false", "No", "OFF"):  # not even imported: the hook's line costs nothing more
        assert probe(interpreter, MPS_SHIM=off) == (False, None, None)
    assert probe(interpreter, MPS_SHIM="Yes")[2] is True

    # A bad option given to the hook stops the process with its one line and status 2 (no page of traceback).
    env = clean_env(MPS_SHIM="1", MPS_SHIM_PRECISION="bf17")
    bad = subprocess.run([str(interpreter), "-c", "print('ran')"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "ran" not in bad.stdout
    assert bad.stderr.strip().splitlines() == [
        "mps-shim: MPS_SHIM_PRECISION='bf17' is not accepted; use one of auto, bf16, fp16, fp32"
    ]

    # So does a value of MPS_SHIM that is neither on nor off.
    env = clean_env(MPS_SHIM="2")
    bad = subprocess.run([str(interpreter), "-c", "print('ran')"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "ran" not in bad.stdout
    assert bad.stderr.strip().splitlines() == [
        "mps-shim: MPS_SHIM='2' is neither on nor off; use 1, true, yes or on to switch the shim on, "
        "0, false, no, off or nothing to switch it off"
    ]


def test_the_command_enters_through_mps_shim_entry(tmp_path):
    """The console script imports mps_shim_entry before the package, so the command's options win over the
    environment (shim/mps_shim_entry.py); pyproject.toml's [project.scripts] says so."""
    interpreter = bare_venv(tmp_path / "venv")
    project = source_copy(tmp_path / "project")
    pip_install(interpreter, project, editable=False)
    script = (interpreter.parent / "mps-shim").read_text()
    assert "from mps_shim_entry import main" in script, script
