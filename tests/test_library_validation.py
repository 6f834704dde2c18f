"""The real validation code of the installed transformers and accelerate, with the device taken as MPS at the
narrowest point (torch's own MPS probes), refuses mixed precision without the shim and accepts the run with it."""
import os
import re

import pytest
import torch

import mps_shim
from support import installed_version

TRANSFORMERS = installed_version("transformers")
ACCELERATE = installed_version("accelerate")


@pytest.fixture
def mac_on_macos_13(monkeypatch):
    """torch reports an Apple GPU on macOS 13.6: every library above decides from these three calls."""
    from accelerate.state import AcceleratorState, PartialState

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: (13, 6) >= (major, minor))
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


@pytest.fixture
def shim():
    mps_shim.activate(simulate="macos=13.6,torch=2.8,memory=16GiB")  # the newest torch with MPS on macOS 13
    yield
    mps_shim.deactivate()


def bf16_refusal() -> str:
    if TRANSFORMERS.release < (4, 42):
        return "BF16 Mixed precision training with AMP (`--bf16`) and BF16 half precision evaluation"
    return "Your setup doesn't support bf16/gpu"


def accelerate_refusal(precision: str) -> str:
    if precision == "fp16":
        return "fp16 mixed precision requires a GPU (not 'mps')"  # 0.30 - 1.10
    return "bf16 mixed precision requires PyTorch >= 1.10 and a supported device"


def mixed_precision_handed_to_accelerate(args) -> str:
    # transformers 4.x passes it through the environment, 5.x as an argument (docs/mps-facts.md, libraries)
    return getattr(args, "mixed_precision", None) or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


@pytest.mark.skipif(
    (4, 42) <= TRANSFORMERS.release < (4, 52),
    reason="transformers 4.42-4.51 do not check bf16 on MPS (docs/mps-facts.md, libraries)",
)
def test_transformers_refuses_bf16_without_the_shim(mac_on_macos_13, tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match=re.escape(bf16_refusal())):
        TrainingArguments(output_dir=str(tmp_path), bf16=True)


def test_transformers_accepts_the_run_with_the_shim(mac_on_macos_13, shim, tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), bf16=True)
    assert (args.bf16, args.fp16) == (False, False)
    assert mixed_precision_handed_to_accelerate(args) == "no"
    assert mps_shim.report()["precision"]["chosen"] == "fp16"  # the shim runs it, with loss scaling


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_accelerate_refuses_without_the_shim(mac_on_macos_13, precision):
    from accelerate import Accelerator

    if precision == "fp16" and ACCELERATE.release >= (1, 11):
        pytest.skip("accelerate 1.11+ accepts fp16 on MPS with torch >= 2.8 (docs/mps-facts.md, libraries)")
    with pytest.raises(ValueError, match=re.escape(accelerate_refusal(precision))):
        Accelerator(mixed_precision=precision)


@pytest.mark.parametrize("flag", ["fp16", "bf16"])
def test_accelerate_gets_no_precision_to_refuse_with_the_shim(mac_on_macos_13, shim, tmp_path, flag):
    from accelerate import Accelerator
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), **{flag: True})
    accelerator = Accelerator(mixed_precision=mixed_precision_handed_to_accelerate(args))
    assert accelerator.mixed_precision == "no" and accelerator.device.type == "mps"
