"""What several test files share: running commands the way a user would, in this stack's environment."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MPS_SHIM = str(BIN / "mps-shim")

# Variables of the shim that a test must not inherit from the developer's shell.
SHIM_VARIABLES = (
    "MPS_SHIM",
    "MPS_SHIM_PRECISION",
    "MPS_SHIM_MEMORY_LIMIT",
    "MPS_SHIM_SIMULATE",
    "MPS_SHIM_REPORT",
    "MPS_SHIM_LOG_LEVEL",
    "MPS_SHIM_PLAN_ONLY",
    "MPS_SHIM_PLAN_SIZES",
    "MPS_SHIM_RUN",
    "PYTORCH_ENABLE_MPS_FALLBACK",
    "PYTORCH_MPS_HIGH_WATERMARK_RATIO",
    "PYTORCH_MPS_LOW_WATERMARK_RATIO",
)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh shell in this stack's venv, plus `extra`."""
    environ = {k: v for k, v in os.environ.items() if k not in SHIM_VARIABLES and not k.startswith("PYTEST_")}
    environ["PATH"] = f"{BIN}{os.pathsep}{environ.get('PATH', '')}"
    environ["HF_HUB_OFFLINE"] = "1"
    environ["TOKENIZERS_PARALLELISM"] = "false"
    environ.update(extra)
    return environ


def run(args, *, env: dict[str, str] | None = None, cwd=None, timeout: float = 600, check: bool = False):
    result = subprocess.run(
        [str(a) for a in args], env=env or clean_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def python(code: str, **kwargs):
    return run([sys.executable, "-c", code], **kwargs)


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def installed_version(distribution: str):
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version(distribution))
