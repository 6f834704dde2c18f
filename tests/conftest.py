"""Shared fixtures.

Fixtures of the example (examples/): the paths of the sample SFT data and the tiny Llama-3
model, built once per test session.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# `import mps_shim` activates the shim; the test process itself must stay unpatched (compatibility patches would
# otherwise change transformers under every in-process test). Tests that want it call mps_shim.activate().
_switch = os.environ.get("MPS_SHIM")
os.environ["MPS_SHIM"] = "0"
import mps_shim  # noqa: E402,F401

if _switch is None:
    del os.environ["MPS_SHIM"]
else:
    os.environ["MPS_SHIM"] = _switch

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = REPO_ROOT / "examples"
EXAMPLE_SFT_DIR = EXAMPLES_DIR / "sft"
TINY_MODEL_BUILDER = EXAMPLES_DIR / "tiny_model" / "build_tiny_model.py"


def build_tiny_model(output_dir, seed=0):
    """Run the tiny-model builder of the example with this interpreter."""
    subprocess.run(
        [sys.executable, str(TINY_MODEL_BUILDER), "--output", str(output_dir), "--seed", str(seed)],
        check=True, capture_output=True, text=True,
    )
    return output_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny Llama-3 model and tokenizer of the example (seed 0), built once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "llama3-tiny")


@pytest.fixture(scope="session")
def sample_sft_dir():
    """The sample training data folder (--dataset_dir); read it, don't write into it."""
    return EXAMPLES_DIR / "data" / "sft"


@pytest.fixture(scope="session")
def sample_validation_file():
    """The sample validation file (--validation_file); read it, don't write into it."""
    return EXAMPLES_DIR / "data" / "validation.json"


@pytest.fixture
def sample_data_copy(tmp_path, sample_sft_dir, sample_validation_file):
    """A private copy of the sample data, for runs that write the per-file token cache next to it.

    Returns (dataset_dir, validation_file).
    """
    dataset_dir = shutil.copytree(sample_sft_dir, tmp_path / "data" / "sft")
    validation_file = shutil.copy(sample_validation_file, tmp_path / "data" / "validation.json")
    return Path(dataset_dir), Path(validation_file)
