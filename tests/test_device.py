"""shim/device.py on a (fake) Mac, and the capability table (shim/capabilities.py) against the reference matrix.

There is no Mac here: the torch module handed to `probe_mps`/`MpsMemory`/`detect` is a fake whose `mps` has or lacks
each call and whose calls may raise, which is what differs between torch releases and machines. Everything else
(capabilities, psutil, the plan) is the real code.
"""
from __future__ import annotations

import platform
from types import SimpleNamespace

import pytest

from mps_shim.capabilities import (
    autocast_refusal,
    bf16_tensor_error,
    check_mac,
    max_buffer_length,
    mps_capabilities,
    recommended_working_set,
)
from mps_shim.config import Options
from mps_shim.device import MpsMemory, _memory_total, detect, probe_mps
from mps_shim.plan import plan_precision

GiB = 2**30


class FakeTensor:
    def __init__(self, value: float):
        self.value = value

    def __matmul__(self, other):
        return FakeTensor(self.value * other.value * 2)  # a dot product of two 2-vectors of ones

    def item(self):
        return self.value


def _raise(error):
    def call(*args, **kwargs):
        raise error

    return call


def fake_torch(version="2.6.0", bf16="works", **mps_calls):
    """A torch module as a Mac would have it. bf16: "works", "raises", "wrong"; mps_calls: torch.mps functions."""
    calls = []

    def ones(*shape, dtype=None, device=None):
        calls.append(("ones", dtype, device))
        if bf16 == "raises":
            raise TypeError("MPS BFloat16 is only supported on MacOS 14 or newer")
        return FakeTensor(1.0 if bf16 == "works" else float("nan"))

    torch = SimpleNamespace(
        __version__=version,
        bfloat16="torch.bfloat16",
        ones=ones,
        mps=SimpleNamespace(**mps_calls),
        backends=SimpleNamespace(mps=SimpleNamespace(is_available=lambda: True, is_built=lambda: True)),
        cuda=SimpleNamespace(is_available=lambda: False),
    )
    torch.calls = calls
    return torch


@pytest.fixture
def macos(monkeypatch):
    def set_version(version: str):
        monkeypatch.setattr(platform, "mac_ver", lambda: (version, ("", "", ""), "arm64"))

    set_version("14.5")
    return set_version


# --- probe_mps ---------------------------------------------------------------------------------------------------------


def test_probe_reads_torch_macos_and_metal(macos):
    macos("15.1")
    torch = fake_torch("2.13.0", recommended_max_memory=lambda: 22 * GiB)
    facts = probe_mps(torch)
    assert (facts.type, facts.simulated, facts.macos, facts.torch) == ("mps", False, "15.1", "2.13.0")
    assert facts.recommended_max_bytes == 22 * GiB
    assert facts.capabilities == mps_capabilities("2.13.0", "15.1")
    assert facts.capabilities.bf16_tensors and facts.capabilities.autocast_dtypes == ("bf16", "fp16")
    assert torch.calls == [("ones", "torch.bfloat16", "mps")]  # the live bf16 probe ran, on the GPU


def test_probe_strips_the_local_version_and_follows_macos(macos):
    macos("13.6")
    torch = fake_torch("2.4.1+abc", recommended_max_memory=lambda: GiB)
    facts = probe_mps(torch)
    assert facts.torch == "2.4.1" and facts.macos == "13.6"
    assert facts.capabilities.bf16_tensors is False
    assert facts.capabilities.bf16_tensor_error == "MPS BFloat16 is only supported on MacOS 14 or newer"
    assert torch.calls == []  # the table already says no: nothing is allocated to find out


@pytest.mark.parametrize("bf16", ["raises", "wrong"])
def test_failing_bf16_probe_turns_bf16_off(macos, bf16):
    macos("14.5")
    facts = probe_mps(fake_torch("2.6.0", bf16=bf16, recommended_max_memory=lambda: 8 * GiB))
    assert facts.capabilities.bf16_tensors is False
    assert facts.capabilities.bf16_tensor_error == "bf16 probe failed on this Mac"
    assert mps_capabilities("2.6.0", "14.5").bf16_tensors is True  # the table alone would have said yes
    # And the plan follows the probe, not the table: --bf16 becomes fp16 with loss scaling.
    plan = plan_precision(facts, "bf16", "bfloat16")
    assert (plan.chosen, plan.loss_scaling) == ("fp16", True)
    assert "bf16 tensors on MPS need" in plan.reason


def test_recommended_max_falls_back_to_the_working_set_rule_before_torch_2_5(macos):
    total = _memory_total()
    assert total, "psutil must report the machine's memory"
    facts = probe_mps(fake_torch("2.4.1"))  # torch 2.4 has no torch.mps.recommended_max_memory
    assert facts.recommended_max_bytes == recommended_working_set(total)
    assert facts.memory_total_bytes == total
    assert facts.capabilities.recommended_max_memory_api is False


@pytest.mark.parametrize(
    "recommended", [_raise(RuntimeError("Metal device lost")), lambda: None, lambda: 0], ids=["raises", "None", "0"]
)
def test_recommended_max_that_fails_falls_back_too(macos, recommended):
    facts = probe_mps(fake_torch("2.6.0", recommended_max_memory=recommended))
    assert facts.recommended_max_bytes == recommended_working_set(_memory_total())


def test_torch_without_mps_module_still_probes(macos):
    torch = fake_torch("2.6.0")
    del torch.mps
    facts = probe_mps(torch)
    assert facts.type == "mps" and facts.recommended_max_bytes == recommended_working_set(_memory_total())


@pytest.mark.parametrize(
    "backend",
    [
        SimpleNamespace(is_available=_raise(RuntimeError("no Metal")), is_built=lambda: True),
        SimpleNamespace(is_available=lambda: True, is_built=_raise(OSError("broken build"))),
        SimpleNamespace(is_available=lambda: False, is_built=lambda: True),
        SimpleNamespace(),  # a torch too old to know about MPS
    ],
    ids=["is_available raises", "is_built raises", "not available", "no mps backend"],
)
def test_failing_availability_probe_means_unsupported_not_a_crash(backend):
    torch = fake_torch("2.6.0")
    torch.backends.mps = backend
    facts = detect(Options(), torch)
    assert facts.type == "cpu" and facts.capabilities is None and not facts.is_mps


def test_detect_takes_the_mps_path_when_available(macos):
    facts = detect(Options(), fake_torch("2.8.0", recommended_max_memory=lambda: 5 * GiB))
    assert facts.is_mps and not facts.simulated and facts.recommended_max_bytes == 5 * GiB
    assert facts.capabilities.grad_scaler is True


# --- MpsMemory ---------------------------------------------------------------------------------------------------------


def test_mps_memory_calls_that_exist_and_work():
    received = []
    torch = fake_torch(
        recommended_max_memory=lambda: 100,
        current_allocated_memory=lambda: 10,
        driver_allocated_memory=lambda: 20,
        empty_cache=lambda: None,
        set_per_process_memory_fraction=lambda fraction: received.append(fraction),
    )
    memory = MpsMemory(torch)
    assert (memory.recommended_max(), memory.allocated(), memory.driver()) == (100, 10, 20)
    assert memory.empty_cache() is True  # ran, even though it returns None
    assert memory.set_fraction(1) is True
    assert received == [1.0] and type(received[0]) is float  # torch rejects an int fraction


def test_mps_memory_calls_that_are_missing():
    memory = MpsMemory(fake_torch())
    assert (memory.recommended_max(), memory.allocated(), memory.driver()) == (None, None, None)
    assert memory.empty_cache() is False and memory.set_fraction(0.5) is False
    bare = SimpleNamespace(__version__="2.0.1")  # no torch.mps at all
    assert MpsMemory(bare).recommended_max() is None and MpsMemory(bare).empty_cache() is False


def test_mps_memory_calls_that_raise():
    failing = {
        name: _raise(RuntimeError(f"{name} failed"))
        for name in (
            "recommended_max_memory",
            "current_allocated_memory",
            "driver_allocated_memory",
            "empty_cache",
            "set_per_process_memory_fraction",
        )
    }
    memory = MpsMemory(fake_torch(**failing))
    assert (memory.recommended_max(), memory.allocated(), memory.driver()) == (None, None, None)
    assert memory.empty_cache() is False
    assert memory.set_fraction(0.9) is False


# --- the capability table's rows, as torch's macOS wheels show them (docs/mps-facts.md; tests/test_evidence.py checks
# the same table against evidence/torch-macos.json, release by release) ----------------------------------------------

AUTOCAST_25 = (
    "warning",
    "In MPS autocast, but the target dtype is not supported. Disabling autocast.\n"
    "MPS Autocast only supports dtype of torch.bfloat16 currently.",
)
AUTOCAST_MACOS13 = (
    "warning",
    "In MPS autocast, but the target dtype torch.bfloat16 is not supported on macOS versions below 14. "
    "Disabling autocast.",
)
NO_MPS_AUTOCAST = ("error", "User specified an unsupported autocast device_type 'mps'")
FP32_29 = (
    "warning",
    "In MPS autocast, but the target dtype is not supported. Disabling autocast.\n"
    "MPS Autocast only supports dtype of torch.bfloat16 and torch.float16 currently.",
)
FP32_210 = (
    "warning",
    "In MPS autocast, but the target dtype is not supported. Disabling autocast.\n"
    "MPS Autocast only supports dtypes of torch.bfloat16, torch.float16 currently.",
)


def _fact(kind: str, torch: str, macos: str):
    if kind.startswith("autocast:"):
        return autocast_refusal(torch, macos, kind.split(":")[1])
    if kind == "bf16_error":
        return bf16_tensor_error(torch, macos)
    if kind == "check_mac":
        return check_mac(torch, macos) is None  # True: such a Mac exists
    return getattr(mps_capabilities(torch, macos), kind)


# (row of the matrix, torch, macOS, what is asked, what the matrix says)
MATRIX_ROWS = [
    # C(a) torch.autocast(device_type="mps")
    ("C(a) <=2.4 fp16", "2.4.1", "14.5", "autocast:fp16", NO_MPS_AUTOCAST),
    ("C(a) <=2.4 bf16", "2.3.1", "14.5", "autocast:bf16", NO_MPS_AUTOCAST),
    ("C(a) <=2.4 dtypes", "2.4.1", "14.5", "autocast_dtypes", ()),
    ("C(a) 2.5 fp16", "2.5.1", "14.5", "autocast:fp16", None),
    ("C(a) 2.5 bf16", "2.5.1", "14.5", "autocast:bf16", AUTOCAST_25),
    ("C(a) 2.5 fp32", "2.5.1", "14.5", "autocast:fp32", AUTOCAST_25),
    ("C(a) 2.5 dtypes", "2.5.1", "15.1", "autocast_dtypes", ("fp16",)),
    ("C(a) 2.6 bf16 macOS 14", "2.6.0", "14.0", "autocast:bf16", None),
    ("C(a) 2.6 bf16 macOS 13", "2.6.0", "13.6", "autocast:bf16", AUTOCAST_MACOS13),
    ("C(a) 2.8 bf16 macOS 13", "2.8.0", "13.6", "autocast:bf16", AUTOCAST_MACOS13),
    ("C(a) 2.8 fp16 macOS 13", "2.8.0", "13.6", "autocast:fp16", None),
    ("C(a) 2.9 fp32 wording", "2.9.1", "14.5", "autocast:fp32", FP32_29),
    ("C(a) 2.10 fp32 wording", "2.10.0", "14.5", "autocast:fp32", FP32_210),
    ("C(a) 2.6-2.9 dtypes macOS 14", "2.7.1", "14.5", "autocast_dtypes", ("bf16", "fp16")),
    ("C(a) 2.6-2.9 dtypes macOS 13", "2.8.0", "13.6", "autocast_dtypes", ("fp16",)),
    ("C(a) 2.10 has no MPS on macOS 13", "2.10.0", "13.6", "check_mac", False),
    ("C(a) 2.13-2.15 dtypes", "2.13.0", "15.1", "autocast_dtypes", ("bf16", "fp16")),
    ("C(a) 2.15 bf16", "2.15.0", "14.0", "autocast:bf16", None),
    # C(b) bf16 tensors and matmul
    ("C(b) 2.0", "2.0.1", "14.5", "bf16_error",
     "Trying to convert BFloat16 to the MPS backend but it does not have support for that dtype."),
    ("C(b) 2.1", "2.1.2", "14.5", "bf16_error", "BFloat16 is not supported on MPS"),
    ("C(b) 2.2", "2.2.2", "14.5", "bf16_error", "BFloat16 is not supported on MPS"),
    ("C(b) 2.3 macOS 13", "2.3.1", "13.6", "bf16_error", "MPS BFloat16 is only supported on MacOS 14 or newer"),
    ("C(b) 2.8 macOS 13", "2.8.0", "13.6", "bf16_error", "MPS BFloat16 is only supported on MacOS 14 or newer"),
    ("C(b) 2.3 macOS 14", "2.3.1", "14.0", "bf16_error", None),
    ("C(b) 2.3 macOS 14 tensors", "2.3.1", "14.0", "bf16_tensors", True),
    ("C(b) 2.2 macOS 14 tensors", "2.2.2", "14.5", "bf16_tensors", False),
    ("2.11 installs on macOS 13 but has no MPS there", "2.11.0", "13.6", "check_mac", False),
    ("MPS floor 12.3 up to 2.4", "2.4.1", "12.6", "check_mac", True),
    ("MPS floor 13.0 from 2.5, whatever its text says", "2.5.1", "12.6", "check_mac", False),
    ("MPS floor 13.0 in 2.6", "2.6.0", "12.6", "check_mac", False),
    ("MPS floor 13.0 through 2.8", "2.8.0", "13.0", "check_mac", True),
    ("MPS floor 14.0 from 2.9", "2.9.1", "13.6", "check_mac", False),
    ("MPS floor 14.0 met", "2.9.1", "14.0", "check_mac", True),
    ("C(b) wheels 2.12 need macOS 14", "2.12.0", "13.6", "check_mac", False),
    # C(c) GradScaler on MPS
    ("C(c) 2.5 GradScaler fails", "2.5.1", "14.5", "grad_scaler", False),
    ("C(c) 2.7 GradScaler fails", "2.7.1", "14.5", "grad_scaler", False),
    ("C(c) 2.8 GradScaler works", "2.8.0", "14.5", "grad_scaler", True),
    ("fused AdamW on mps from 2.5", "2.5.0", "14.5", "fused_adamw", True),
    ("no fused AdamW on mps in 2.4", "2.4.1", "14.5", "fused_adamw", False),
    # Torch floor for each feature on MPS: at the floor, and the release before it
    ("floor bf16 tensors 2.3 on macOS 14", "2.3.0", "14.0", "bf16_tensors", True),
    ("below floor bf16 tensors", "2.2.2", "14.0", "bf16_tensors", False),
    ("floor bf16 tensors needs macOS 14", "2.3.0", "13.6", "bf16_tensors", False),
    ("floor fp16 autocast 2.5", "2.5.0", "14.5", "autocast:fp16", None),
    ("below floor fp16 autocast", "2.4.1", "14.5", "autocast:fp16", NO_MPS_AUTOCAST),
    ("floor bf16 autocast 2.6", "2.6.0", "14.5", "autocast:bf16", None),
    ("below floor bf16 autocast", "2.5.1", "14.5", "autocast:bf16", AUTOCAST_25),
    ("floor GradScaler 2.8", "2.8.0", "14.5", "grad_scaler", True),
    ("below floor GradScaler", "2.7.1", "14.5", "grad_scaler", False),
    ("floor recommended_max_memory 2.5", "2.5.0", "14.5", "recommended_max_memory_api", True),
    ("below floor recommended_max_memory", "2.4.1", "14.5", "recommended_max_memory_api", False),
    ("SDPA sdpa_vector fixed in 2.12", "2.12.0", "14.5", "sdpa_noncontiguous_correct", True),
    ("SDPA sdpa_vector defect in 2.11", "2.11.0", "14.5", "sdpa_noncontiguous_correct", False),
    ("SDPA sdpa_vector defect from 2.8", "2.8.0", "14.5", "sdpa_noncontiguous_correct", False),
    ("no sdpa_vector kernels in 2.7", "2.7.1", "14.5", "sdpa_noncontiguous_correct", True),
    ("floor wheels need macOS 14 from 2.12", "2.12.0", "14.0", "check_mac", True),
    ("2.11 on macOS 12.3: no MPS", "2.11.0", "12.3", "check_mac", False),
]


@pytest.mark.parametrize("row, torch, macos, kind, expected", MATRIX_ROWS, ids=[row[0] for row in MATRIX_ROWS])
def test_capability_table_rows(row, torch, macos, kind, expected):
    assert _fact(kind, torch, macos) == expected


def test_the_working_set_and_buffer_rules_where_torch_cannot_ask_metal():
    assert recommended_working_set(16 * 2**30) == 16 * 2**30 * 2 // 3
    assert recommended_working_set(64 * 2**30) == 64 * 2**30 * 3 // 4
    assert recommended_working_set(128 * 2**30) == 128 * 2**30 * 84 // 100  # a 128 GB Mac on macOS 26
    assert max_buffer_length(16 * 2**30) == 8 * 2**30  # Metal's maxBufferLength: about half of RAM


def test_a_real_macs_memory_is_judged_on_the_drivers_total_and_its_peak_counter():
    from mps_shim.device_memory import DeviceMemory

    figures = {"live": 100, "driver": 300}
    torch = fake_torch(
        current_allocated_memory=lambda: figures["live"], driver_allocated_memory=lambda: figures["driver"],
        empty_cache=lambda: None,
    )
    runtime = SimpleNamespace(simulator=None, budget=SimpleNamespace(bytes=1000))
    device = DeviceMemory(runtime, torch)
    assert device.in_use() == 300 and device.allocated() == 100  # what MPSAllocator checks, not the live tensors
    device.reset_peak()
    figures["driver"] = 700
    device.sample()
    figures["driver"] = 400
    assert device.peak() == 700  # no allocator statistics: the largest sample of the driver's total
    # torch 2.13+: the allocator's own peak of its heaps, plus what MPS holds beside them now.
    torch.accelerator = SimpleNamespace(
        memory_stats=lambda: {"reserved_bytes.all.current": 350, "reserved_bytes.all.peak": 900},
        reset_peak_memory_stats=lambda: None,
    )
    assert device.peak() == 900 + (400 - 350)


def test_a_live_autocast_probe_that_contradicts_the_table_wins_and_says_so(macos):
    import contextlib

    macos("15.1")
    torch = fake_torch(version="2.13.0")
    torch.float16, torch.bfloat16 = "torch.float16", "torch.bfloat16"
    active = []

    @contextlib.contextmanager
    def autocast(device, dtype):
        # This Mac's MPS autocasts fp16, but leaves bf16 matmuls in fp32 (as a driver regression might).
        active.append(dtype if dtype == torch.float16 else "torch.float32")
        yield
        active.pop()

    class Probe(FakeTensor):
        def __matmul__(self, other):
            result = FakeTensor(1.0)
            result.dtype = active[-1]
            return result

    torch.autocast = autocast
    torch.ones = lambda *shape, dtype=None, device=None: Probe(1.0) if dtype is None else FakeTensor(1.0)
    facts = probe_mps(torch)
    assert mps_capabilities("2.13.0", "15.1").autocast_dtypes == ("bf16", "fp16")  # what the table says
    assert facts.capabilities.autocast_dtypes == ("fp16",)
    assert facts.probe_notes == ("the table says bf16 autocast runs here; the probe found it does not",)
    assert plan_precision(facts, "bf16", "bfloat16").chosen == "fp16"  # and the plan follows the probe
