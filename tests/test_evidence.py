"""The capability table, every version gate and every text the simulated Mac prints, against what torch's own macOS
wheels say (evidence/torch-macos.json, written by `make evidence`; read offline here).

A new torch release is one `make evidence`: where the shim and the wheels disagree, one of these tests names the
release and the fact.
"""
from __future__ import annotations

import json
import re
import types
import warnings

import pytest
import torch

from mps_shim.capabilities import (
    autocast_checks_when_disabled,
    autocast_refusal,
    bf16_tensor_error,
    check_mac,
    mps_capabilities,
    mps_macos_floor,
)
from mps_shim.config import load_options
from mps_shim.device import simulated_facts
from mps_shim.report import Report
from mps_shim.simulate import Simulator
from mps_shim.simulated_memory import format_size

from support import REPO

EVIDENCE = json.loads((REPO / "evidence" / "torch-macos.json").read_text())
RELEASES = {release["release"]: release for release in EVIDENCE["releases"]}
ROWS = {row["release"]: row for row in EVIDENCE["summary"]["rows"]}
NEWEST_MACOS = "15.1"
DTYPES = {"torch.float16": "fp16", "torch.bfloat16": "bf16"}


def test_the_evidence_covers_every_release_the_shim_supports():
    from mps_shim.capabilities import SIMULATED_TORCH_NEWEST, SIMULATED_TORCH_OLDEST

    minors = [int(release.split(".")[1]) for release in RELEASES]
    assert sorted(minors) == list(range(int(SIMULATED_TORCH_OLDEST.split(".")[1]),
                                        int(SIMULATED_TORCH_NEWEST.split(".")[1]) + 1))
    assert all(RELEASES[r]["wheel"]["sha256"] and RELEASES[r]["wheel"]["file"].startswith(f"torch-{r}") for r in RELEASES)


@pytest.mark.parametrize("release", sorted(ROWS, key=lambda r: int(r.split(".")[1])))
class TestOneRelease:
    def test_where_mps_exists(self, release):
        row = ROWS[release]
        # What the device constructor probes decides; where it probes nothing, what the wheel installs on.
        needed = row["device_requires_macos"] or ("14.0" if row["platform_tag"].startswith("macosx_14") else "11.0")
        assert str(mps_macos_floor(release)) == needed
        major, minor = (int(part) for part in needed.split("."))
        below = f"{major - 1}.6" if minor == 0 else f"{major}.{minor - 1}"
        assert check_mac(release, below) is not None
        assert check_mac(release, needed) is None
        installs_on_13 = row["platform_tag"] == "macosx_11_0_arm64"
        assert ("installs only on macOS 14" in (check_mac(release, "13.6") or "")) == (not installs_on_13)

    def test_autocast(self, release):
        row = ROWS[release]
        autocast = RELEASES[release]["autocast"]
        refusal = autocast_refusal(release, NEWEST_MACOS, "fp16")
        if not row["autocast_mps_accepted"]:
            assert refusal == ("error", autocast["unsupported_device_error"].replace("{self.device}", "mps"))
            assert mps_capabilities(release, NEWEST_MACOS).autocast_dtypes == ()
        else:
            accepted = sorted(DTYPES[d] for d in row["autocast_mps_dtypes"])
            assert sorted(mps_capabilities(release, NEWEST_MACOS).autocast_dtypes) == accepted
            assert autocast_refusal(release, NEWEST_MACOS, "fp32") == ("warning", row["autocast_fp32_warning"])
        when_disabled = row["autocast_mps_raises_when_disabled"] or row["autocast_mps_warns_when_disabled"]
        assert autocast_checks_when_disabled(release) == when_disabled
        macos_warning = autocast["bf16_below_macos14_warning"]
        if row["autocast_bf16_below_macos14_check"] == "reachable" and check_mac(release, "13.6") is None:
            assert autocast_refusal(release, "13.6", "bf16") == ("warning", macos_warning)

    def test_the_simulated_mac_says_what_that_torch_says(self, release):
        if check_mac(release, NEWEST_MACOS) is not None:
            pytest.skip(f"torch {release} has no Mac with macOS {NEWEST_MACOS}")
        simulator = simulator_for(f"macos={NEWEST_MACOS},torch={release},memory=16GiB")
        try:
            row = ROWS[release]
            if not row["autocast_mps_accepted"]:
                with pytest.raises(RuntimeError) as raised:
                    torch.autocast("mps", dtype=torch.float16, enabled=False)
                assert str(raised.value) == RELEASES[release]["autocast"]["unsupported_device_error"].replace(
                    "{self.device}", "mps")
            else:
                with warnings.catch_warnings(record=True) as said:
                    warnings.simplefilter("always")
                    torch.autocast("mps", dtype=torch.float32)
                assert [str(w.message) for w in said] == [row["autocast_fp32_warning"]]
        finally:
            simulator.uninstall()

    def test_memory_texts(self, release):
        row = ROWS[release]
        allocator = RELEASES[release]["allocator"]
        units = [unit.strip() for unit in row["oom_units"] if unit.strip() != "bytes"]
        for size, unit in zip((3 * 2**10, 3 * 2**20, 3 * 2**30), units):
            assert format_size(size + 1, release).endswith(f" {unit}")
        assert allocator["invalid_buffer_size_text"] == "Invalid buffer size: "
        assert row["invalid_buffer_size_limit_source"] == "maxBufferLength"  # not the working set
        assert allocator["high_watermark_error"] == "invalid high watermark ratio "
        assert allocator["low_watermark_error"] == "invalid low watermark ratio "
        # The limit is checked on what driver_allocated_memory() reports, which the guard therefore measures.
        assert row["driver_allocated_memory_selectors"] == ["currentAllocatedSize"]
        assert "currentAllocatedSize" in row["limit_check_selectors"]
        templates = {message["template"] for message in allocator["oom_messages"]}
        assert templates == set(OOM_TEMPLATES)

    def test_precision_and_optimizers(self, release):
        row = ROWS[release]
        capabilities = mps_capabilities(release, NEWEST_MACOS)
        assert row["mps_in_foreach_devices"] is False  # shim/estimate.py counts no foreach temporaries
        assert capabilities.fused_adamw == row["fused_adam_on_mps"]
        assert capabilities.grad_scaler == row["grad_scaler_unscale_avoids_float64_on_mps"]
        assert row["custom_scaler_without_step_is_unaffected"] is True  # why fused AdamW stays under the shim's scaler
        assert capabilities.sdpa_noncontiguous_correct == (row["sdpa_vector_kernels"] == 0 or release_at_least(release, 12))
        texts = RELEASES[release]["bf16"]["texts"]
        expected = bf16_tensor_error(release, "13.6")
        if check_mac(release, "13.6") is None or not release_at_least(release, 3):
            assert expected in texts


def simulator_for(profile: str) -> Simulator:
    options = load_options(simulate=profile)
    simulator = Simulator(simulated_facts(options), types.SimpleNamespace(report=Report(None), options=options))
    simulator.install(torch)
    return simulator


def release_at_least(release: str, minor: int) -> bool:
    return int(release.split(".")[1]) >= minor


# The two texts MPSAllocator raises, as the simulator writes them (shim/simulated_memory.py), in the evidence's form.
OOM_TEMPLATES = (
    "MPS backend out of memory (MPS allocated: {size}, other allocations: {size}). Tried to allocate {size} on {pool} "
    "pool.",
    "MPS backend out of memory (MPS allocated: {size}, other allocations: {size}, max allowed: {size}). Tried to "
    "allocate {size} on {pool} pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory "
    "allocations (may cause system failure).",
)


def test_the_simulators_out_of_memory_texts_are_those_templates():
    simulator = simulator_for("macos=15.1,torch=2.13,memory=16GiB")
    try:
        simulator.adopt(torch.nn.Linear(4, 4))
        texts = []
        for fraction in (1e-6, 0.0):  # with torch's limit, and with it lifted (the text has no "max allowed")
            simulator.set_memory_fraction(fraction)
            texts.append(str(simulator.memory._out_of_memory(3 * 2**20)))
    finally:
        simulator.uninstall()
    size = r"(\d+ bytes|\d+\.\d\d [KMG]iB)"
    for text, template in zip(texts, reversed(OOM_TEMPLATES)):
        pattern = re.escape(template).replace(re.escape("{size}"), size).replace(re.escape("{pool}"), "private")
        assert re.fullmatch(pattern, text), text
