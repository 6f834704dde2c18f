"""Ops that run on the CPU instead of the Apple GPU (PYTORCH_ENABLE_MPS_FALLBACK=1): named and counted.

On the simulated Mac, an op the emulated torch release has no MPS kernel for warns as torch's mps_fallback does
(shim/simulated_fallback.py, data from the wheels in shim/cpu_fallback_ops.py); the shim counts every call.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from support import MPS_SHIM, clean_env, python, read_json, run

from mps_shim.simulated_fallback import WARNING, fallback_ops

SCRIPT = Path(__file__).parent / "scripts" / "isin_loss_trainer.py"
ISIN = "aten::isin.Tensor_Tensor_out"
TORCH_MESSAGE = "is not currently supported on the MPS backend and will fall back to run on the CPU"


def train(tmp_path, torch_release, **environ):
    report = tmp_path / "report.json"
    result = run(
        [MPS_SHIM, "--simulate", f"macos=14.5,torch={torch_release},memory=16GiB", "--report", report, SCRIPT,
         "--output_dir", tmp_path / "out", "--max_steps", "3", "--per_device_train_batch_size", "4",
         "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1"],
        env=clean_env(**environ),
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(next(line for line in result.stdout.splitlines() if line.startswith('{"isin_calls"')))
    return result, read_json(report), seen


def test_every_call_of_an_op_without_mps_kernel_is_counted_in_the_report_and_the_end_of_run_line(tmp_path):
    result, report, seen = train(tmp_path, "2.3")
    calls = seen["isin_calls"]
    assert seen["steps"] == 3 and calls >= 3
    # torch warns once per process (TORCH_WARN_ONCE); the shim counts every call, and shows each op once
    assert report["cpu_fallbacks"] == {"observed": "every call", "complete": True, "ops": {ISIN: calls}}
    assert result.stderr.count(TORCH_MESSAGE) == 1
    assert f"mps-shim: ran on the CPU instead of the Apple GPU: {ISIN} ({calls} calls)" in result.stderr.splitlines()
    events = [e for e in report["events"] if e["kind"] == "cpu_fallback"]
    assert [e["detail"].split(" ")[0] for e in events] == [ISIN]
    assert any(c["target"] == "torch.set_warn_always" and c["to"] is True for c in report["changes"])


def test_a_script_that_silences_warnings_is_still_counted(tmp_path):
    # warnings.filterwarnings("ignore") after torch loaded: the shim's filter goes back in front when the model is
    # placed and when training starts.
    result, report, seen = train(tmp_path, "2.3", SILENCE_WARNINGS="1")
    assert report["cpu_fallbacks"]["ops"] == {ISIN: seen["isin_calls"]}
    assert f"{ISIN} ({seen['isin_calls']} calls)" in result.stderr


def test_a_release_with_the_kernel_has_no_fallback(tmp_path):
    result, report, seen = train(tmp_path, "2.4")  # isin got its MPS kernel in 2.4
    assert report["cpu_fallbacks"]["ops"] == {}
    assert TORCH_MESSAGE not in result.stderr and "ran on the CPU instead" not in result.stderr


EMULATED_ONCE = """
import json, warnings
import mps_shim
mps_shim.activate(simulate="macos=14.5,torch=2.3,memory=16GiB")
import torch
from mps_shim.runtime import current
runtime = current()
SET_ALWAYS
runtime.place(torch.nn.Linear(2, 2))
seen = []
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    a, b = torch.arange(3), torch.full((1,), 2)  # made by ops after the model was placed: device tensors
    for _ in range(3):
        torch.isin(a, b)
        torch.isin(b, a)
print(json.dumps([str(w.message).split("'")[1] for w in caught if "MPS backend" in str(w.message)]))
print(json.dumps(runtime.fallbacks.counts if runtime.fallbacks._torch is not None else None))
"""


@pytest.mark.parametrize("always", [False, True])
def test_the_simulated_warning_follows_torch_warn_once(always):
    # Without warn-always torch's mps_fallback warns for the first op of the process only; with it, on every call.
    code = EMULATED_ONCE.replace(
        "SET_ALWAYS", "runtime.fallbacks.uninstall(); torch.set_warn_always(False)" if not always else "pass"
    )
    result = python(code, env=clean_env(MPS_SHIM_LOG_LEVEL="quiet"), check=True)
    names, counts = (json.loads(line) for line in result.stdout.splitlines()[-2:])
    if always:  # the shim's way: every call counted, each op shown once
        assert counts == {"aten::isin.Tensor_Tensor_out": 6}
        assert names == ["aten::isin.Tensor_Tensor_out"]
    else:  # torch's own: the first fallback of the process, and nothing after
        assert counts is None and names == ["aten::isin.Tensor_Tensor_out"]


def test_cpu_side_data_never_falls_back():
    # Tensors made before the model was placed are CPU data on a Mac too: isin on them runs on the CPU by design.
    code = (
        "import json, warnings\n"
        "import mps_shim\n"
        "mps_shim.activate(simulate='macos=14.5,torch=2.3,memory=16GiB')\n"
        "import torch\n"
        "from mps_shim.runtime import current\n"
        "a, b = torch.tensor([1, 2, 3]), torch.tensor([2])\n"
        "current().place(torch.nn.Linear(2, 2))\n"
        "torch.isin(a, b)\n"
        "on_device = torch.arange(3)  # made by an op after the model was placed\n"
        "torch.isin(on_device, b)\n"
        "print(json.dumps(current().fallbacks.counts))\n"
    )
    result = python(code, env=clean_env(MPS_SHIM_LOG_LEVEL="quiet"), check=True)
    assert json.loads(result.stdout.splitlines()[-1]) == {ISIN: 1}  # only the call with a device tensor


def test_the_fallback_lists_follow_the_wheels():
    # Ops that gained MPS kernels, by release, as read from the wheels' registrations (evidence/fallback_ops.py).
    assert fallback_ops("2.3")["isin.Tensor_Tensor"] == "isin.Tensor_Tensor_out"  # falls back under the out name
    assert "isin.Tensor_Tensor" not in fallback_ops("2.4")
    assert "_fused_adamw_" in fallback_ops("2.4") and "_fused_adamw_" not in fallback_ops("2.5")  # capabilities.py
    assert "_amp_update_scale_" in fallback_ops("2.7") and "_amp_update_scale_" not in fallback_ops("2.8")
    assert "embedding_renorm_" in fallback_ops("2.15")  # MPSFallback.mm registers the CPU fallback for it itself
    assert not [op for op in fallback_ops("2.13") if op.endswith("_for_cpu")]  # the CPU's own routes
    assert "mm.out" not in fallback_ops("2.2") and "addmm.out" not in fallback_ops("2.2")
    evidence = json.loads((Path(__file__).parent.parent / "evidence" / "torch-macos.json").read_text())
    regex = evidence["releases"][-1]["cpu_fallback"]["warning_regex"]
    import re

    assert re.match(regex, WARNING.format(op=ISIN))


def test_doctor_model_lists_the_fallbacks_of_one_training_step(tmp_path, tiny_model_dir):
    env = clean_env(MPS_SHIM_SIMULATE="macos=14.5,torch=2.13,memory=16GiB")
    result = run([MPS_SHIM, "doctor", "--model", tiny_model_dir, "--json"], env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout)["cpu_fallbacks"]
    assert probe["ops"] == {} and probe["lora"] is True and probe["observed"] == "every call"
    text = run([MPS_SHIM, "doctor", "--model", tiny_model_dir], env=env, timeout=300)
    assert f"cpu fallbacks in one forward, backward and AdamW step of {tiny_model_dir}: none (" in text.stdout
    missing = run([MPS_SHIM, "doctor", "--model", tmp_path / "nothing"], env=env)
    assert missing.returncode == 2 and "no such folder" in missing.stderr
