"""Without the shim, on this Linux machine without CUDA, the example fails where the upstream does.

What fails first depends on the installed transformers:
- transformers 4.40 (the upstream's era): arguments parse (`--bf16` is allowed on CPU), torchrun's
  LOCAL_RANK makes accelerate pick MULTI_CPU, the data is tokenized, and the model load stops at the
  integer `device_map={"": 0}`. With torch 2.13 an integer device means "the current accelerator"
  (torch PR 129119), not CUDA, so the error is torch's "Cannot access accelerator device when none
  is available." rather than the older "Torch not compiled with CUDA enabled".
- transformers 5: the script's first import, `send_example_telemetry`, no longer exists. With that
  import put back, the next stop is transformers' own bf16 check (now also on CPU-only machines).
"""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import transformers.utils

from conftest import EXAMPLE_SFT_DIR

HAS_TELEMETRY = hasattr(transformers.utils, "send_example_telemetry")
VENV_BIN = str(Path(sys.executable).parent)


def run_sft_sh(tiny_model_dir, dataset_dir, validation_file, output_dir, extra_path=None):
    """Run the stock run_sft.sh under sh with this interpreter's torchrun; return (exit code, output)."""
    env = dict(os.environ)
    env.update({
        "PATH": os.pathsep.join(filter(None, [extra_path, VENV_BIN, env["PATH"]])),
        "PRETRAINED_MODEL": str(tiny_model_dir),
        "DATASET_DIR": str(dataset_dir),
        "VALIDATION_FILE": str(validation_file),
        "OUTPUT_DIR": str(output_dir),
        "HF_HUB_OFFLINE": "1",
    })
    result = subprocess.run(["sh", str(EXAMPLE_SFT_DIR / "run_sft.sh")], env=env, capture_output=True, text=True,
                            timeout=300)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.skipif(not HAS_TELEMETRY, reason="transformers without send_example_telemetry stops at the import")
def test_stops_at_the_integer_device_map(tiny_model_dir, sample_data_copy, tmp_path):
    dataset_dir, validation_file = sample_data_copy
    returncode, output = run_sft_sh(tiny_model_dir, dataset_dir, validation_file, tmp_path / "out")
    assert returncode != 0
    # torchrun's LOCAL_RANK made accelerate choose MULTI_CPU (reference §2.1), and --bf16 was accepted.
    assert "device: cpu:0" in output and "distributed training: True, 16-bits training: True" in output
    assert "Num train_samples  210" in output  # the data pipeline ran before the failure
    assert "in load_model" in output and "RuntimeError: Cannot access accelerator device when none is available." in output
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.skipif(HAS_TELEMETRY, reason="this transformers still has send_example_telemetry")
def test_stops_at_the_telemetry_import(tiny_model_dir, sample_data_copy, tmp_path):
    dataset_dir, validation_file = sample_data_copy
    returncode, output = run_sft_sh(tiny_model_dir, dataset_dir, validation_file, tmp_path / "out")
    assert returncode != 0
    assert "ImportError: cannot import name 'send_example_telemetry' from 'transformers.utils'" in output


# A torchrun stand-in that runs the script in-process after putting back send_example_telemetry,
# the one thing the shim is expected to restore first; everything else stays as upstream.
TORCHRUN_WITH_TELEMETRY = """#!{python}
import os, runpy, sys
import transformers.utils
transformers.utils.send_example_telemetry = lambda *args, **kwargs: None
script, arguments = sys.argv[5], sys.argv[6:]
os.environ["LOCAL_RANK"] = "0"
sys.path.insert(0, os.path.dirname(script))
sys.argv = [script] + arguments
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.skipif(HAS_TELEMETRY, reason="only transformers without send_example_telemetry needs it put back")
def test_with_telemetry_restored_stops_at_the_bf16_check(tiny_model_dir, sample_data_copy, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    torchrun = fake_bin / "torchrun"
    torchrun.write_text(TORCHRUN_WITH_TELEMETRY.format(python=sys.executable))
    torchrun.chmod(torchrun.stat().st_mode | stat.S_IEXEC)
    dataset_dir, validation_file = sample_data_copy
    returncode, output = run_sft_sh(tiny_model_dir, dataset_dir, validation_file, tmp_path / "out",
                                    extra_path=str(fake_bin))
    assert returncode != 0
    assert "in parse_arguments" in output
    assert "ValueError: Your setup doesn't support bf16/gpu." in output
