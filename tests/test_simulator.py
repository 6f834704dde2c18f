"""The simulated Apple GPU (shim/simulate.py), checked with real torch and a real tiny LLaMA."""
import re
import types
import warnings

import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

# tests/conftest.py imports mps_shim without activating it (MPS_SHIM=0 for that import).
from mps_shim.config import SimulationProfile, load_options
from mps_shim.device import simulated_facts
from mps_shim.report import Report
from mps_shim.simulate import Simulator
from mps_shim.simulated_memory import format_size

transformers = pytest.importorskip("transformers")

MODERN = "macos=14.5,torch=2.5,memory=16GiB"
OOM_WITH_LIMIT = re.compile(
    r"MPS backend out of memory \(MPS allocated: \d+\.\d\d (KB|MB|KiB|MiB), other allocations: 0 bytes, "
    r"max allowed: (?P<max>[\d.]+ \w+)\)\. Tried to allocate (\d+ bytes|\d+\.\d\d (KB|MB|KiB|MiB)) on private pool\. "
    r"Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0\.0 to disable upper limit for memory allocations "
    r"\(may cause system failure\)\."
)
OOM_WITHOUT_LIMIT = re.compile(
    r"MPS backend out of memory \(MPS allocated: \d+\.\d\d (KB|MB|GB), other allocations: 0 bytes\)\. "
    r"Tried to allocate (\d+ bytes|\d+\.\d\d (KB|MB|GB)) on private pool\."
)
# The smallest Mac there is, and a high watermark that leaves the tiny model about a megabyte (low kept in torch's
# proportion to it): a run that cannot fit, on a Mac that exists.
SMALLEST_MAC = "macos=14.5,torch=2.5,memory=8GiB"
TINY_HIGH_WATERMARK = 0.0002075


@pytest.fixture
def tiny_budget(monkeypatch):
    monkeypatch.setenv("PYTORCH_MPS_HIGH_WATERMARK_RATIO", str(TINY_HIGH_WATERMARK))
    monkeypatch.setenv("PYTORCH_MPS_LOW_WATERMARK_RATIO", str(TINY_HIGH_WATERMARK * 1.4 / 1.7))


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    monkeypatch.delenv("PYTORCH_MPS_HIGH_WATERMARK_RATIO", raising=False)
    monkeypatch.delenv("PYTORCH_MPS_LOW_WATERMARK_RATIO", raising=False)
    torch.manual_seed(0)


@pytest.fixture
def simulators():
    """Builds installed simulators for a simulation profile and uninstalls them after the test."""
    made = []

    def make(profile=MODERN):
        facts = simulated_facts(load_options(simulate=profile))
        simulator = Simulator(facts, types.SimpleNamespace(report=Report(None)))
        simulator.install(torch)
        made.append(simulator)
        return simulator

    yield make
    for simulator in made:
        simulator.uninstall()
    assert _get_current_dispatch_mode() is None


def tiny_llama(dtype=torch.float32, tie=False):
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config).to(dtype)


def param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def train(model, steps=1, batch=2, seq=16, simulator=None):
    """A few AdamW steps. Returns the optimizer and the simulator's allocated bytes after the last optimizer step,
    before zero_grad."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    after_step = None
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        del loss
        optimizer.step()
        after_step = simulator.allocated_bytes() if simulator else None
        optimizer.zero_grad()
    return optimizer, after_step


# -- memory accounting --------------------------------------------------------------------------------------------


def test_nothing_counts_and_no_mode_is_active_before_adopt(simulators):
    simulator = simulators()
    torch.ones(1000)
    assert _get_current_dispatch_mode() is None
    assert simulator.peak_bytes == 0
    assert simulator.memory_report() == {
        "allocated_bytes": 0,
        "driver_bytes": 0,
        "budget_bytes": int(1.7 * simulator.facts.recommended_max_bytes),
        "peak_bytes": 0,
    }


def test_adopt_counts_parameters_once_even_when_tied(simulators):
    untied, tied = tiny_llama(), tiny_llama(tie=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    buffers = sum(b.numel() * b.element_size() for b in untied.buffers())

    simulator = simulators()
    simulator.adopt(untied)
    assert simulator.allocated_bytes() == param_bytes(untied) + buffers
    simulator.uninstall()

    simulator = simulators()
    simulator.adopt(tied)
    # Module.parameters() already skips the shared weight; the storage table must not count it twice either.
    assert simulator.allocated_bytes() == param_bytes(tied) + buffers
    assert param_bytes(tied) == param_bytes(untied) - tied.lm_head.weight.numel() * 4


def test_backward_runs_through_the_mode_and_gradients_count(simulators):
    simulator = simulators()
    layer = torch.nn.Linear(256, 256, bias=False)
    simulator.adopt(layer)
    weight = 256 * 256 * 4
    assert simulator.allocated_bytes() == weight
    x = torch.randn(8, 256)  # an input batch, which on a Mac would be copied to the GPU: it counts too
    layer(x).sum().backward()
    assert layer.weight.grad is not None
    assert simulator.allocated_bytes() == weight + weight + x.numel() * 4


def test_views_count_once_and_freed_memory_is_cached_until_empty_cache(simulators):
    simulator = simulators()
    layer = torch.nn.Linear(4, 4)
    simulator.adopt(layer)
    before = simulator.allocated_bytes()
    assert before == (16 + 4) * 4
    x = torch.zeros(1000)
    views = [x.view(10, 100), x[10:], x.unsqueeze(0)]
    x.add_(1)
    assert simulator.allocated_bytes() == before + 4000
    del x
    assert simulator.allocated_bytes() == before + 4000  # the views keep the storage alive
    del views
    assert simulator.allocated_bytes() == before
    assert simulator.driver_bytes() == before + 4000
    torch.zeros(500)  # fits in the cache: reuses it
    assert simulator.driver_bytes() == before + 4000
    simulator.empty_cache()
    assert simulator.driver_bytes() == simulator.allocated_bytes() == before


def test_cpu_side_tensors_from_before_adopt_never_count(simulators):
    simulator = simulators()
    dataset = torch.zeros(10_000)
    layer = torch.nn.Linear(4, 4)
    simulator.adopt(layer)
    before = simulator.allocated_bytes()
    dataset.add_(1)
    first_rows = dataset.view(100, 100)[:10]
    assert simulator.allocated_bytes() == before
    first_rows.sum()  # a new result does count (4 bytes) while it lives
    assert simulator.peak_bytes == before + 4


def test_training_counts_parameters_gradients_adam_state_and_activations(simulators):
    simulator = simulators()
    model = tiny_llama()
    params = param_bytes(model)
    simulator.adopt(model)
    optimizer, after_step = train(model, simulator=simulator)
    # parameters + gradients + AdamW's exp_avg and exp_avg_sq
    assert after_step >= params * (1 + 1 + 2)
    # zero_grad frees the gradients; the activations saved for backward were freed by backward
    after_zero_grad = simulator.allocated_bytes()
    assert params * 3 <= after_zero_grad < after_step
    assert simulator.peak_bytes > after_step


def test_peak_grows_with_batch_and_sequence(simulators):
    peaks = []
    for batch, seq in [(1, 16), (2, 16), (2, 64), (4, 128)]:
        simulator = simulators()
        model = tiny_llama()
        simulator.adopt(model)
        train(model, batch=batch, seq=seq)
        peaks.append(simulator.peak_bytes)
        simulator.uninstall()
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks), peaks


def test_bf16_weights_take_half_the_parameter_bytes(simulators):
    simulator = simulators()
    simulator.adopt(tiny_llama(torch.float32))
    fp32 = simulator.allocated_bytes()
    simulator.uninstall()
    simulator = simulators()
    simulator.adopt(tiny_llama(torch.bfloat16))
    bf16 = simulator.allocated_bytes()
    assert bf16 == pytest.approx(fp32 / 2, rel=0.01)


def test_reset_peak(simulators):
    simulator = simulators()
    model = tiny_llama()
    simulator.adopt(model)
    train(model)
    assert simulator.peak_bytes > simulator.allocated_bytes()
    simulator.reset_peak()
    assert simulator.peak_bytes == simulator.allocated_bytes()


# -- the budget and the out-of-memory error -----------------------------------------------------------------------


def test_training_fits_a_large_mac(simulators):
    simulator = simulators("macos=14.5,torch=2.5,memory=64GiB")
    model = tiny_llama()
    simulator.adopt(model)
    train(model, steps=3)
    assert 0 < simulator.peak_bytes <= simulator.budget_bytes


def test_training_runs_out_of_memory_under_a_tiny_limit_with_the_mps_text(simulators, tiny_budget):
    simulator = simulators(SMALLEST_MAC)
    # max allowed = high watermark x recommendedMaxWorkingSetSize (two thirds of 8 GiB) = 1188274 bytes
    assert simulator.budget_bytes == int(TINY_HIGH_WATERMARK * simulator.facts.recommended_max_bytes) == 1188274
    model = tiny_llama()
    simulator.adopt(model)
    with pytest.raises(RuntimeError) as raised:
        train(model, steps=3)
    assert type(raised.value) is RuntimeError  # MPS raises a plain RuntimeError, not torch.OutOfMemoryError
    text = str(raised.value)
    match = OOM_WITH_LIMIT.fullmatch(text)
    assert match, text
    assert match["max"] == "1.13 MB"  # torch 2.5 prints decimal-looking units
    # The output that did not fit was dropped: what is counted is within the budget.
    assert simulator.allocated_bytes() <= simulator.budget_bytes
    assert simulator.runtime.report.data["events"][-1] == {"kind": "simulated_oom", "step": None, "detail": text}


def test_outputs_of_an_op_that_runs_out_of_memory_are_dropped(simulators, tiny_budget):
    simulator = simulators(SMALLEST_MAC)
    layer = torch.nn.Linear(4, 4)
    simulator.adopt(layer)
    kept = [torch.randn(120_000), torch.randn(60_000)]
    before = simulator.allocated_bytes()
    # sort returns values (240 kB, fits) and indices (480 kB, does not): the values must go too
    with pytest.raises(RuntimeError, match="Tried to allocate 468.75 KB on private pool"):
        torch.sort(kept[1])
    assert simulator.allocated_bytes() == before
    assert simulator.driver_bytes() == before + 240_000  # the values' memory went back to the cache


def test_memory_fraction_sets_the_limit(simulators):
    simulator = simulators("macos=14.5,torch=2.6,memory=16GiB")
    model = tiny_llama()
    simulator.adopt(model)
    simulator.set_memory_fraction(1e-4)
    assert simulator.budget_bytes == int(1e-4 * simulator.facts.recommended_max_bytes)
    with pytest.raises(RuntimeError) as raised:
        train(model, steps=3)
    match = OOM_WITH_LIMIT.fullmatch(str(raised.value))
    assert match, str(raised.value)
    assert match["max"] == "1.09 MB"  # torch 2.6 still prints MPSAllocator's own units: binary ones from 2.8


def test_memory_fraction_wants_a_float_in_range(simulators):
    simulator = simulators()
    with pytest.raises(TypeError) as raised:
        simulator.set_memory_fraction(1)
    assert str(raised.value) == "Invalid type for fraction argument, must be `float`"
    with pytest.raises(ValueError, match="Allowed range: 0~2"):
        simulator.set_memory_fraction(2.5)


def test_a_buffer_larger_than_metal_allows_is_refused(simulators):
    simulator = simulators(SMALLEST_MAC)
    simulator.adopt(torch.nn.Linear(4, 4))
    # Metal's limit is about the recommended working set, 5.33 GB on an 8 GiB Mac (the CPU's pages are never touched)
    with pytest.raises(RuntimeError) as raised:
        torch.empty(simulator.facts.recommended_max_bytes, dtype=torch.uint8)
    assert str(raised.value) == "Invalid buffer size: 5.33 GB"


def test_format_size_follows_the_emulated_torch():
    assert format_size(1024, "2.2") == "1024 bytes"
    assert format_size(1025, "2.2") == "1.00 KB"
    assert format_size(int(9.07 * 2**30), "2.2") == "9.07 GB"
    assert format_size(int(242.48 * 2**20), "2.13") == "242.48 MiB"
    assert format_size(3 * 2**30, "2.13") == "3.00 GiB"


# -- watermarks ---------------------------------------------------------------------------------------------------


def test_high_watermark_alone_below_the_default_low_one_fails_at_first_allocation(simulators, monkeypatch):
    monkeypatch.setenv("PYTORCH_MPS_HIGH_WATERMARK_RATIO", "1.0")
    simulator = simulators()
    with pytest.raises(RuntimeError) as raised:
        simulator.adopt(torch.nn.Linear(4, 4))
    assert str(raised.value) == "invalid low watermark ratio 1.4"
    assert _get_current_dispatch_mode() is None


def test_high_watermark_out_of_range(simulators, monkeypatch):
    monkeypatch.setenv("PYTORCH_MPS_HIGH_WATERMARK_RATIO", "2.5")
    simulator = simulators()
    with pytest.raises(RuntimeError) as raised:
        simulator.adopt(torch.nn.Linear(4, 4))
    assert str(raised.value) == "invalid high watermark ratio 2.5"


def test_both_watermarks_set_the_limit(simulators, monkeypatch):
    monkeypatch.setenv("PYTORCH_MPS_HIGH_WATERMARK_RATIO", "1.0")
    monkeypatch.setenv("PYTORCH_MPS_LOW_WATERMARK_RATIO", "0.8")
    simulator = simulators()
    simulator.adopt(torch.nn.Linear(4, 4))
    assert simulator.budget_bytes == simulator.facts.recommended_max_bytes


def test_high_watermark_zero_lifts_the_limit_to_the_machine(simulators, monkeypatch):
    monkeypatch.setenv("PYTORCH_MPS_HIGH_WATERMARK_RATIO", "0.0")
    simulator = simulators(SMALLEST_MAC)
    assert simulator.budget_bytes == 8 * 2**30
    simulator.adopt(torch.nn.Linear(4, 4))
    # buffers each below Metal's largest: 7 GB fit in the 8 GiB Mac, 10.5 GB do not (the CPU's pages are never touched)
    kept = [torch.empty(3_500_000_000, dtype=torch.uint8) for _ in range(2)]  # noqa: F841 (held)
    with pytest.raises(RuntimeError) as raised:
        torch.empty(3_500_000_000, dtype=torch.uint8)
    assert OOM_WITHOUT_LIMIT.fullmatch(str(raised.value)), str(raised.value)


# -- bf16 refusals ------------------------------------------------------------------------------------------------

BF16_ERRORS = {
    "2.0": "Trying to convert BFloat16 to the MPS backend but it does not have support for that dtype.",
    "2.2": "BFloat16 is not supported on MPS",
    "2.5": "MPS BFloat16 is only supported on MacOS 14 or newer",
}


@pytest.mark.parametrize("torch_version", sorted(BF16_ERRORS))
def test_bf16_is_refused_with_the_real_text(simulators, torch_version):
    # torch 2.0 is below what a simulation profile may name (shim/capabilities.py); the simulator still knows its text
    simulator = simulators(SimulationProfile(macos="13.6", torch=torch_version, memory_bytes=16 * 2**30))
    expected = BF16_ERRORS[torch_version]
    with pytest.raises(TypeError) as raised:
        simulator.adopt(tiny_llama(torch.bfloat16))
    assert str(raised.value) == expected

    simulator.adopt(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError) as raised:
        torch.ones(3, dtype=torch.bfloat16)
    assert str(raised.value) == expected
    with pytest.raises(TypeError):
        torch.ones(3).to(torch.bfloat16)
    torch.ones(3, dtype=torch.float64)  # float64 is not refused (see simulate.py)


def test_bf16_works_on_macos_14_with_torch_2_5(simulators):
    simulator = simulators("macos=14.5,torch=2.5,memory=16GiB")
    model = tiny_llama(torch.bfloat16)
    simulator.adopt(model)
    train(model)
    assert torch.ones(3, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_bf16_on_the_cpu_before_adopt_is_allowed(simulators):
    simulators("macos=13.6,torch=2.2,memory=16GiB")
    checkpoint = tiny_llama(torch.bfloat16).state_dict()  # loading a bf16 checkpoint on the CPU
    assert checkpoint["lm_head.weight"].dtype == torch.bfloat16


# -- autocast -----------------------------------------------------------------------------------------------------


def matmul_dtype():
    return (torch.randn(4, 8) @ torch.randn(8, 4)).dtype


def test_autocast_before_torch_2_5_is_an_error_even_disabled(simulators):
    simulators("macos=14.5,torch=2.2,memory=16GiB")
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(RuntimeError, match=r"^User specified an unsupported autocast device_type 'mps'$"):
            torch.autocast("mps", dtype=dtype)
    with pytest.raises(RuntimeError):  # torch checks the device type before it reads `enabled`
        torch.autocast("mps", dtype=torch.float16, enabled=False)


def test_autocast_bf16_on_torch_2_5_warns_and_disables(simulators):
    simulators("macos=14.5,torch=2.5,memory=16GiB")
    with pytest.warns(UserWarning) as warned:
        context = torch.autocast("mps", dtype=torch.bfloat16)
    assert str(warned[0].message) == (
        "In MPS autocast, but the target dtype is not supported. Disabling autocast.\n"
        "MPS Autocast only supports dtype of torch.bfloat16 currently."
    )
    with context:
        assert not torch.is_autocast_enabled("cpu")
        assert matmul_dtype() == torch.float32
    with pytest.warns(UserWarning):  # 2.5-2.9 check the dtype even when autocast is disabled
        torch.autocast("mps", dtype=torch.bfloat16, enabled=False)


def test_autocast_fp16_on_torch_2_5_runs_matmul_in_fp16(simulators):
    simulator = simulators("macos=14.5,torch=2.5,memory=16GiB")
    model = tiny_llama()
    simulator.adopt(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        context = torch.autocast("mps", dtype=torch.float16)
    with context:
        assert matmul_dtype() == torch.float16
        loss = model(input_ids=torch.randint(0, 512, (1, 8)), labels=torch.randint(0, 512, (1, 8))).loss
    assert torch.isfinite(loss)
    assert matmul_dtype() == torch.float32


def test_autocast_bf16_on_macos_13_with_torch_2_6_warns_with_the_macos_text(simulators):
    simulators("macos=13.6,torch=2.6,memory=16GiB")
    with pytest.warns(UserWarning) as warned:
        context = torch.autocast("mps", dtype=torch.bfloat16)
    assert str(warned[0].message) == (
        "In MPS autocast, but the target dtype torch.bfloat16 is not supported on macOS versions below 14. "
        "Disabling autocast."
    )
    with context:
        assert matmul_dtype() == torch.float32


def test_autocast_bf16_on_macos_14_with_torch_2_6_runs(simulators):
    simulators("macos=14.5,torch=2.6,memory=16GiB")
    with torch.autocast("mps", dtype=torch.bfloat16):
        assert matmul_dtype() == torch.bfloat16
    with torch.autocast("mps", dtype=torch.bfloat16, enabled=False):
        assert matmul_dtype() == torch.float32


@pytest.mark.parametrize(("version", "wording"), [
    ("2.9", "dtype of torch.bfloat16 and torch.float16 currently."),
    ("2.10", "dtypes of torch.bfloat16, torch.float16 currently."),
])
def test_an_fp32_autocast_warns_with_that_releases_text_and_2_10_checks_only_when_enabled(simulators, version, wording):
    simulators(f"macos=14.5,torch={version},memory=16GiB")
    with pytest.warns(UserWarning) as warned:
        torch.autocast("mps", dtype=torch.float32)
    assert str(warned[0].message).endswith("MPS Autocast only supports " + wording)
    with warnings.catch_warnings(record=True) as disabled:
        warnings.simplefilter("always")
        torch.autocast("mps", dtype=torch.float32, enabled=False)
    assert bool(disabled) == (version == "2.9")


def test_uninstall_gives_torch_its_own_autocast_back(simulators):
    original = vars(torch.amp.autocast_mode.autocast)["__init__"]
    simulator = simulators("macos=14.5,torch=2.2,memory=16GiB")
    assert vars(torch.amp.autocast_mode.autocast)["__init__"] is not original
    simulator.uninstall()
    assert vars(torch.amp.autocast_mode.autocast)["__init__"] is original


# -- life cycle ---------------------------------------------------------------------------------------------------


def test_uninstall_leaves_no_mode_and_reinstall_works(simulators):
    simulator = simulators()
    simulator.adopt(torch.nn.Linear(4, 4))
    assert _get_current_dispatch_mode() is not None
    simulator.uninstall()
    simulator.uninstall()
    assert _get_current_dispatch_mode() is None
    assert simulator.memory_report()["allocated_bytes"] == 0 and simulator.peak_bytes == 0

    simulator.install(torch)
    simulator.install(torch)
    assert _get_current_dispatch_mode() is None
    layer = torch.nn.Linear(8, 8, bias=False)
    simulator.adopt(layer)
    assert simulator.allocated_bytes() == 8 * 8 * 4
    simulator.uninstall()
    assert _get_current_dispatch_mode() is None


def test_uninstall_under_another_mode_keeps_that_mode(simulators):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counting(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counting.calls += 1
            return func(*args, **(kwargs or {}))

    simulator = simulators()
    simulator.adopt(torch.nn.Linear(4, 4))
    with Counting() as counting:
        simulator.uninstall()
        assert _get_current_dispatch_mode() is counting
        torch.ones(2) + 1
        assert Counting.calls > 0
    assert _get_current_dispatch_mode() is None


def test_one_buffer_of_half_the_macs_memory_is_refused_below_the_working_set(simulators):
    # An 8 GB Mac: working set ~5.3 GB, limit ~9 GB, but Metal's maxBufferLength is ~4 GB.
    simulator = simulators("macos=14.5,torch=2.13,memory=8GiB")
    simulator.adopt(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match=r"^Invalid buffer size: 4\.50 GiB$"):
        torch.empty(int(4.5 * 2**30), dtype=torch.uint8)
    assert simulator.allocated_bytes() < 2**20


def test_out_of_memory_sizes_switch_to_binary_units_in_torch_2_8():
    assert format_size(3 * 2**30, "2.7") == "3.00 GB"
    assert format_size(3 * 2**30, "2.8") == "3.00 GiB"
