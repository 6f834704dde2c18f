"""Single patches, in process, on the simulated Apple GPU: what each one changes, and that it is reported."""
import warnings

import pytest
import torch

import mps_shim


@pytest.fixture
def shim(request):
    mps_shim.activate(simulate=request.param)
    yield mps_shim
    mps_shim.deactivate()


def changes():
    return {change["target"]: change for change in mps_shim.report()["changes"]}


@pytest.mark.parametrize("shim", ["macos=14.5,torch=2.5,memory=16GiB"], indirect=True)
def test_a_cuda_bf16_autocast_becomes_the_macs_fp16(shim):
    layer = torch.nn.Linear(8, 8)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(torch.randn(2, 8))
    assert out.dtype == torch.float16  # the plan's dtype, on the (simulated) Apple GPU
    assert changes()["torch.autocast(device_type=)"]["to"] == "mps"
    assert changes()["torch.autocast(dtype=)"]["to"] == "float16"


@pytest.mark.parametrize("shim", ["macos=14.5,torch=2.2,memory=16GiB"], indirect=True)
def test_a_cuda_autocast_on_torch_2_2_becomes_a_disabled_one_not_a_crash(shim):
    # torch 2.2 has no MPS autocast: torch.autocast("mps", ...) raises there even with enabled=False, and the
    # simulated Mac raises it too (tests/test_simulator.py); the patch must never hand it one.
    layer = torch.nn.Linear(8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(torch.randn(2, 8))
        with torch.autocast("cuda", enabled=False):
            layer(torch.randn(2, 8))
    assert out.dtype == torch.float32
    assert changes()["torch.autocast(device_type=)"]["to"] == "disabled"


@pytest.mark.parametrize("shim", ["macos=14.5,torch=2.10,memory=16GiB"], indirect=True)
def test_sdpa_gets_contiguous_inputs_in_torch_2_8_to_2_11(shim):
    import torch.nn.functional as functional

    assert hasattr(functional.scaled_dot_product_attention, "__wrapped__")
    query = torch.randn(2, 6, 4, 64).transpose(1, 2)  # (batch, heads, seq, dim), not contiguous, as LLaMA passes it
    out = functional.scaled_dot_product_attention(query, query, query)
    reference = functional.scaled_dot_product_attention.__wrapped__(*(query.contiguous(),) * 3)
    assert torch.equal(out, reference)
    assert "torch.nn.functional.scaled_dot_product_attention" in changes()


@pytest.mark.parametrize("shim", ["macos=15.1,torch=2.13,memory=16GiB", "macos=14.5,torch=2.5,memory=16GiB"],
                         indirect=True)
def test_sdpa_is_left_alone_where_torch_has_no_sdpa_vector_defect(shim):
    import torch.nn.functional as functional

    assert not hasattr(functional.scaled_dot_product_attention, "__wrapped__")


@pytest.mark.parametrize("shim", ["macos=14.5,torch=2.5,memory=16GiB"], indirect=True)
def test_cuda_only_training_options_go_and_fused_adamw_stays_under_loss_scaling(shim, tmp_path):
    from transformers import TrainingArguments

    config = tmp_path / "ds.json"
    config.write_text("{}")
    args = TrainingArguments(
        output_dir=str(tmp_path), fp16=True, optim="adamw_torch_fused", deepspeed=str(config), report_to="none"
    )
    assert mps_shim.report()["precision"]["loss_scaling"] is True
    # The shim's scaler unscales in place and skips an overflowed step itself: fused AdamW never sees a scale.
    assert (args.fp16, args.deepspeed, args.optim) == (False, None, "adamw_torch_fused")
    said = changes()
    assert "TrainingArguments.optim" not in said
    assert said["TrainingArguments.deepspeed"]["to"] is None


@pytest.mark.parametrize("shim", ["macos=15.1,torch=2.13,memory=16GiB"], indirect=True)
def test_peft_adapter_loads_with_an_integer_device_map(shim, tmp_path, tiny_model_dir):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    tuned = PeftModel.from_pretrained(fresh, str(tmp_path), device_map={"": 0}, is_trainable=True)
    assert any("lora_A" in name for name, _ in tuned.named_parameters())
    assert changes()["PeftModel.from_pretrained(device_map=)"]["to"] == {"": "cpu"}
