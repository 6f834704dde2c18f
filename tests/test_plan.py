"""The precision plan is a pure function of the facts: checked here without any training (README decision table)."""
import pytest

from mps_shim.config import load_options
from mps_shim.device import DeviceFacts, simulated_facts
from mps_shim.plan import PlanError, memory_budget, plan_precision, safer_precision


def mac(profile: str) -> DeviceFacts:
    return simulated_facts(load_options({}, simulate=profile))


# (profile, what the run asks, model dtype) -> (chosen, frozen weights, autocast, loss scaling)
TABLE = [
    ("macos=13.6,torch=2.2", "bf16", "bfloat16", ("fp32", "float32", None, False)),
    ("macos=13.6,torch=2.5", "bf16", "bfloat16", ("fp16", "float16", "float16", True)),
    ("macos=14.5,torch=2.4", "bf16", "bfloat16", ("fp32", "float32", None, False)),
    ("macos=14.5,torch=2.5", "bf16", "bfloat16", ("fp16", "float16", "float16", True)),
    ("macos=14.5,torch=2.6", "bf16", "bfloat16", ("bf16", "bfloat16", "bfloat16", False)),
    ("macos=15.1,torch=2.13", "bf16", "bfloat16", ("bf16", "bfloat16", "bfloat16", False)),
    ("macos=13.6,torch=2.8", "bf16", "bfloat16", ("fp16", "float16", "float16", True)),
    ("macos=15.1,torch=2.13", "fp16", "float16", ("fp16", "float16", "float16", True)),
    ("macos=13.6,torch=2.2", "fp16", "float16", ("fp32", "float32", None, False)),
    ("macos=15.1,torch=2.13", "fp32", None, ("fp32", "float32", None, False)),
    ("macos=15.1,torch=2.13", "bf16", None, ("bf16", "float32", "bfloat16", False)),
    # fp32 compute never keeps half weights: fp32 trainable modules could not take their activations
    ("macos=15.1,torch=2.13", "fp32", "bfloat16", ("fp32", "float32", None, False)),
]


@pytest.mark.parametrize("profile, requested, model_dtype, expected", TABLE)
def test_decision_table(profile, requested, model_dtype, expected):
    plan = plan_precision(mac(profile), requested, model_dtype)
    assert (plan.chosen, plan.weights_dtype, plan.autocast_dtype, plan.loss_scaling) == expected
    assert plan.trainable_dtype == "float32" and plan.owner == "mps-shim" and plan.reason


def test_reason_names_what_is_missing():
    plan = plan_precision(mac("macos=14.5,torch=2.5"), "bf16", "bfloat16")
    assert "bf16 needs torch>=2.6" in plan.reason and "torch 2.5" in plan.reason and "loss scaling" in plan.reason


def test_forced_precision_wins_and_an_impossible_one_is_refused():
    assert plan_precision(mac("macos=15.1,torch=2.13"), "bf16", "bfloat16", forced="fp16").chosen == "fp16"
    assert plan_precision(mac("macos=15.1,torch=2.13"), "bf16", "bfloat16", forced="fp32").chosen == "fp32"
    with pytest.raises(PlanError, match=r"^--precision bf16 cannot run on this Mac: .*torch>=2.6"):
        plan_precision(mac("macos=14.5,torch=2.5"), "fp32", None, forced="bf16")


def test_not_a_mac_keeps_what_the_run_asked():
    cpu = DeviceFacts("cpu", False, None, "2.13", None, None, None)
    plan = plan_precision(cpu, "bf16", "bfloat16")
    assert (plan.chosen, plan.weights_dtype, plan.autocast_dtype, plan.owner) == ("bf16", None, None, "library")
    assert memory_budget(cpu, None)[0] is None


def test_fallback_order():
    assert safer_precision(mac("macos=15.1,torch=2.13"), "fp16") == "bf16"
    assert safer_precision(mac("macos=13.6,torch=2.5"), "fp16") == "fp32"
    assert safer_precision(mac("macos=15.1,torch=2.13"), "bf16") == "fp32"
    assert safer_precision(mac("macos=15.1,torch=2.13"), "fp32") is None


def test_budget_is_the_recommended_working_set_unless_limited():
    facts = mac("macos=15.1,torch=2.13,memory=16GiB")
    assert memory_budget(facts, None)[0] == facts.recommended_max_bytes == 16 * 2**30 * 2 // 3
    assert memory_budget(facts, 8 * 2**30) == (8 * 2**30, "--memory-limit")
