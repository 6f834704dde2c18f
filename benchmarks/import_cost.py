"""What mps-shim costs a Python process at start-up: the `MPS_SHIM=1` hook, and `import mps_shim`.

    python benchmarks/import_cost.py [--rounds 30]       (run it with a stack's python, e.g. .venv/current/bin/python)

The fair comparison
-------------------
The hook is a .pth file that site.py reads at the start of *every* Python process of an environment where mps-shim is
installed, so its cost is "the same interpreter and the same site-packages, with and without mps-shim installed".
Comparing against `python -S` (no site at all) or `python -I` (no user site, no PYTHON* variables) would charge the
shim for site.py's own work, and comparing against the stack venv itself would charge it for the stack's other .pth
files (setuptools' distutils-precedence.pth, the editable-install finder), which have nothing to do with the hook.

So the script builds two throwaway venvs from the same base interpreter, identically: `venv --without-pip`, plus one
.pth line that puts this stack's site-packages on sys.path (a path added by a .pth has its own .pth files ignored, so
neither venv runs the stack's hook or its setuptools hooks). Then `pip install --no-deps .` (a regular, non-editable
install, what a user gets) into one of them. The two venvs differ only in mps-shim's files, so:

  (a) bare      venv WITHOUT mps-shim:          python -c pass
  (b) hook off  venv WITH mps-shim, MPS_SHIM unset: python -c pass      -> (b)-(a): the hook's cost when it is off
  (c) import    venv WITH mps-shim, MPS_SHIM unset: python -c "import mps_shim"   -> import + activation
  (d) hook on   venv WITH mps-shim, MPS_SHIM=1:  python -c "import mps_shim"      -> hook + import + activation
  (e) no activation  venv WITH mps-shim, MPS_SHIM=0: python -c "import mps_shim"  -> the package alone (kill switch),
                so (c)-(e) is what activation (building the registry, importing every patch module) costs
  (s) stack     the stack venv itself (editable install), MPS_SHIM unset: python -c pass   (for reference only)

Each round runs every variant once, in a shuffled order, so drift in machine load hits all variants alike; a warm-up
round (not counted) fills the bytecode caches. Times are wall-clock per process, spawn included (the same for all).
Reported: the median of each, its ratio to (a), and the milliseconds it adds to (a), against the goals
(hook < 5 ms added, import < 30 ms added).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "setup.py", "README.md", "shim", "patches")
HOOK_GOAL_MS = 5.0
IMPORT_GOAL_MS = 30.0


def clean_environ(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MPS_SHIM", "PYTORCH_MPS", "PYTHON"))}
    environ.update(extra)
    return environ


def checked(command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, command))}\n{result.stdout}\n{result.stderr}")
    return result


def bare_venv(folder: Path) -> Path:
    """A pip-less venv that imports this stack's packages but runs none of the stack's .pth files."""
    checked([sys.executable, "-m", "venv", "--without-pip", folder])
    interpreter = folder / "bin" / "python"
    site_packages = checked([interpreter, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    (Path(site_packages.stdout.strip()) / "_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return interpreter


def install_shim(interpreter: Path, workspace: Path) -> None:
    """`pip install --no-deps .` of a copy of the source (the repository gets no build/ from us), offline."""
    project = workspace / "project"
    project.mkdir()
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, project / name)
        else:
            (project / name).write_text("mps-shim\n")
    base = [sys.executable, "-m", "pip", "--python", interpreter, "install", "--no-deps", "--no-input", "-q"]
    errors = []
    for isolation in (["--no-build-isolation"], []):  # the stack's setuptools, else the local index's
        result = subprocess.run([*map(str, base), *isolation, str(project)], capture_output=True, text=True,
                                env=clean_environ())
        if result.returncode == 0:
            return
        errors.append(result.stderr[-600:])
    sys.exit("cannot install mps-shim into the benchmark venv:\n" + "\n".join(errors))


def time_once(command: list[str], environ: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mps-shim-bench-") as temporary:
        workspace = Path(temporary)
        bare = bare_venv(workspace / "bare")
        shimmed = bare_venv(workspace / "shimmed")
        install_shim(shimmed, workspace)
        off, on = clean_environ(), clean_environ(MPS_SHIM="1")
        # Sanity: the variants are what they claim to be.
        probe = "import sys; print('mps_shim' in sys.modules)"
        assert checked([bare, "-c", probe], env=on).stdout.strip() == "False", "the bare venv must have no hook"
        assert checked([shimmed, "-c", probe], env=off).stdout.strip() == "False", "the hook must be off by default"
        assert checked([shimmed, "-c", probe], env=on).stdout.strip() == "True", "the hook must start the shim"

        variants = {
            "(a) bare venv, python -c pass": ([str(bare), "-c", "pass"], off),
            "(b) mps-shim installed, MPS_SHIM unset, -c pass": ([str(shimmed), "-c", "pass"], off),
            "(c) MPS_SHIM unset, -c 'import mps_shim'": ([str(shimmed), "-c", "import mps_shim"], off),
            "(d) MPS_SHIM=1, -c 'import mps_shim'": ([str(shimmed), "-c", "import mps_shim"], on),
            "(e) MPS_SHIM=0, -c 'import mps_shim' (no activation)": ([str(shimmed), "-c", "import mps_shim"],
                                                                     clean_environ(MPS_SHIM="0")),
            "(s) stack venv itself, -c pass (reference)": ([sys.executable, "-c", "pass"], off),
        }
        samples: dict[str, list[float]] = {name: [] for name in variants}
        rng = random.Random(options.seed)
        order = list(variants)
        for round_number in range(options.rounds + 1):
            rng.shuffle(order)
            for name in order:
                elapsed = time_once(*variants[name])
                if round_number:  # round 0 warms the caches
                    samples[name].append(elapsed)

    medians = {name: statistics.median(values) for name, values in samples.items()}
    bare_ms = medians["(a) bare venv, python -c pass"]
    print(f"mps-shim start-up cost, {options.rounds} interleaved rounds, Python {sys.version.split()[0]}, "
          f"packages of {sysconfig.get_paths()['purelib']}")
    print(f"{'variant':<52} {'median ms':>10} {'IQR ms':>8} {'x bare':>7} {'+ms':>7}")
    for name, values in samples.items():
        quartiles = statistics.quantiles(values, n=4)
        print(f"{name:<52} {medians[name]:>10.1f} {quartiles[2] - quartiles[0]:>8.1f} "
              f"{medians[name] / bare_ms:>7.2f} {medians[name] - bare_ms:>+7.1f}")

    hook_added = medians["(b) mps-shim installed, MPS_SHIM unset, -c pass"] - bare_ms
    import_added = medians["(c) MPS_SHIM unset, -c 'import mps_shim'"] - bare_ms
    hook_on_added = medians["(d) MPS_SHIM=1, -c 'import mps_shim'"] - bare_ms
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    print()
    print(f"goal: hook (MPS_SHIM unset) adds < {HOOK_GOAL_MS:.0f} ms: {hook_added:+.1f} ms  "
          f"{verdict(hook_added < HOOK_GOAL_MS)}")
    print(f"goal: import mps_shim adds < {IMPORT_GOAL_MS:.0f} ms: {import_added:+.1f} ms  "
          f"{verdict(import_added < IMPORT_GOAL_MS)}")
    print(f"goal: MPS_SHIM=1 (hook + import) adds < {IMPORT_GOAL_MS:.0f} ms: {hook_on_added:+.1f} ms  "
          f"{verdict(hook_on_added < IMPORT_GOAL_MS)}")


if __name__ == "__main__":
    main()
