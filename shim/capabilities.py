"""What MPS can do, by torch version and macOS version: the one table the shim and its simulator share.

Every row comes from ../shared/reference/mps-version-matrix.md (section C and the closing "torch floor" list), which
was checked against the macOS arm64 wheels of each torch release. Pure data and pure functions: no torch import.
"""
from __future__ import annotations

from dataclasses import dataclass

from packaging.version import Version

# torch releases whose Mac wheels need macOS 14 (macosx_14_0_arm64 from 2.12.0 on).
TORCH_NEEDS_MACOS_14 = Version("2.12")
MPS_MIN_MACOS = Version("12.3")


@dataclass(frozen=True)
class MpsCapabilities:
    """What a given torch release on a given macOS does on the Apple GPU."""

    torch: str
    macos: str
    bf16_tensors: bool
    bf16_tensor_error: str | None  # the TypeError text MPS raises for a bf16 tensor, when it does
    autocast_dtypes: tuple[str, ...]  # dtypes torch.autocast("mps") really runs
    grad_scaler: bool  # torch.amp.GradScaler("mps") works (no float64 in unscale_)
    recommended_max_memory_api: bool  # torch.mps.recommended_max_memory() exists
    fused_adamw_honours_scaler: bool  # fused Adam/AdamW skip inf steps and unscale (fix in 2.13.0)
    sdpa_noncontiguous_correct: bool  # SDPA with permuted q/k/v and batch > 1 (fix in 2.12.0)

    def autocast_refusal(self, dtype: str) -> tuple[str, str] | None:
        """How `torch.autocast("mps", dtype)` refuses here: ("error"|"warning", text), or None when it runs."""
        return autocast_refusal(self.torch, self.macos, dtype)


def _v(text: str) -> Version:
    return Version(text)


def _release(text: str) -> Version:
    """Major.minor of a version string ('2.13.0+cpu' -> 2.13), the granularity of every row of the table."""
    parsed = Version(text)
    return Version(f"{parsed.major}.{parsed.minor}")


def bf16_tensor_error(torch_version: str, macos: str) -> str | None:
    """The exact TypeError text MPS gives for a bf16 tensor, or None where bf16 tensors work (matrix C(b))."""
    torch_release = _release(torch_version)
    if torch_release < _v("2.1"):
        return "Trying to convert BFloat16 to the MPS backend but it does not have support for that dtype."
    if torch_release < _v("2.3"):
        return "BFloat16 is not supported on MPS"
    if _release(macos) < _v("14.0"):
        return "MPS BFloat16 is only supported on MacOS 14 or newer"
    return None


def autocast_refusal(torch_version: str, macos: str, dtype: str) -> tuple[str, str] | None:
    """How torch.autocast(device_type="mps", dtype=...) behaves when it does not run (matrix C(a)).

    ("error", text) is a RuntimeError raised on construction; ("warning", text) is a UserWarning after which
    autocast is disabled. dtype is "fp16", "bf16" or "fp32".
    """
    torch_release = _release(torch_version)
    if torch_release < _v("2.5"):
        return ("error", "User specified an unsupported autocast device_type 'mps'")
    if torch_release < _v("2.6"):
        if dtype != "fp16":
            # The text is wrong in torch 2.5 itself (it says bf16 where it means fp16); kept as torch prints it.
            return (
                "warning",
                "In MPS autocast, but the target dtype is not supported. Disabling autocast.\n"
                "MPS Autocast only supports dtype of torch.bfloat16 currently.",
            )
        return None
    if dtype == "fp32":
        return (
            "warning",
            "In MPS autocast, but the target dtype is not supported. Disabling autocast.\n"
            "MPS Autocast only supports dtypes of torch.bfloat16, torch.float16 currently.",
        )
    if dtype == "bf16" and torch_release < _v("2.10") and _release(macos) < _v("14.0"):
        return (
            "warning",
            "In MPS autocast, but the target dtype torch.bfloat16 is not supported on macOS versions below 14. "
            "Disabling autocast.",
        )
    if dtype == "bf16" and _release(macos) < _v("14.0"):
        # torch 2.10+ no longer checks; bf16 kernels then fail like any bf16 tensor would.
        return ("error", bf16_tensor_error(torch_version, macos) or "")
    return None


def mps_capabilities(torch_version: str, macos: str) -> MpsCapabilities:
    """The capability row for one torch release on one macOS version."""
    torch_release = _release(torch_version)
    autocast_dtypes = tuple(d for d in ("bf16", "fp16") if autocast_refusal(torch_version, macos, d) is None)
    bf16_error = bf16_tensor_error(torch_version, macos)
    return MpsCapabilities(
        torch=torch_version,
        macos=macos,
        bf16_tensors=bf16_error is None,
        bf16_tensor_error=bf16_error,
        autocast_dtypes=autocast_dtypes,
        grad_scaler=torch_release >= _v("2.8"),
        recommended_max_memory_api=torch_release >= _v("2.5"),
        fused_adamw_honours_scaler=torch_release >= _v("2.13"),
        sdpa_noncontiguous_correct=torch_release >= _v("2.12"),
    )


def recommended_working_set(memory_total_bytes: int) -> int:
    """Approximate Metal `recommendedMaxWorkingSetSize` for a unified-memory size.

    Used only where torch cannot ask Metal (the simulator, and torch < 2.5 on a real Mac). Apple does not document
    the rule; machines seen report about two thirds of RAM up to 36 GiB (8 GB Mac: ~5.3 GB, matrix C(e)) and three
    quarters above.
    """
    if memory_total_bytes <= 36 * 2**30:
        return memory_total_bytes * 2 // 3
    return memory_total_bytes * 3 // 4


def check_mac(torch_version: str, macos: str) -> str | None:
    """Why this torch/macOS pair cannot exist on a Mac with MPS, or None."""
    if _release(macos) < MPS_MIN_MACOS:
        return f"MPS needs macOS {MPS_MIN_MACOS} or newer, not {macos}"
    if _release(torch_version) >= TORCH_NEEDS_MACOS_14 and _release(macos) < _v("14.0"):
        return f"torch {torch_version} ships only for macOS 14 or newer (torch <= 2.11 runs on macOS {macos})"
    return None
