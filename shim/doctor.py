"""`mps-shim doctor`: each fact about this machine with the reason it matters, as text or JSON."""
from __future__ import annotations

import platform
import sys

from mps_shim._version import __version__
from mps_shim.config import Options
from mps_shim.device import DeviceFacts, detect
from mps_shim.plan import PlanError, memory_budget, plan_precision, precision_support
from mps_shim.units import size_text
from mps_shim.versions import TESTED_RANGES, installed_version, out_of_range_lines

LIBRARIES = ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "datasets")
NO_TORCH = (
    'torch is not installed, so there is no device to probe (mps-shim does not install it: `pip install torch`, or '
    '`pip install "mps-shim[stack]"` for the tested stack)'
)


def diagnose(options: Options, model: str | None = None) -> dict:
    """With `model`, also one training step of that model's architecture on the Apple GPU, listing the ops that
    would run on the CPU (shim/fallback_probe.py); that imports torch and transformers, which doctor otherwise does
    not, and runs first, while torch can still read PYTORCH_ENABLE_MPS_FALLBACK."""
    probe = None
    if model is not None:
        from mps_shim.fallback_probe import probe_fallbacks

        probe = probe_fallbacks(options, model)
    # The installed distributions, not imported: doctor must not import torch or transformers (under simulation it
    # imports neither), and no script's own copy of a library is in play here.
    libraries = {name: installed_version(name) for name in LIBRARIES}
    findings = {
        "shim_version": __version__,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
        "libraries": libraries,
        "tested_ranges": dict(TESTED_RANGES),
        # one sentence per installed library outside its tested range; empty when all are in range or absent
        "outside_tested_range": out_of_range_lines(libraries),
    }
    if libraries["torch"] is None and options.simulate is None:
        # torch is not a dependency of mps-shim: without it there is no device to ask and no plan to make.
        findings.update(device=None, capabilities={"mps": None, "reason": NO_TORCH}, memory=None, precision=None)
        return findings
    facts = detect(options)
    findings |= {
        "device": facts.as_report(),
        "capabilities": _capabilities(facts),
        "memory": _memory(facts, options),
        "precision": _precision(facts, options),
        "known_bugs": _known_bugs(facts),
    }
    if probe is not None:
        findings["cpu_fallbacks"] = probe
    return findings


def _known_bugs(facts: DeviceFacts) -> list[dict]:
    """The silent wrong-result bugs of this torch on MPS (shim/known_bugs.py); none off MPS."""
    from mps_shim.known_bugs import affecting

    if not facts.is_mps:
        return []
    return [{"key": bug.key, "summary": bug.summary, "trigger": bug.trigger, "releases": bug.releases,
             "source": bug.source, "shim": bug.shim} for bug in affecting(facts.torch)]


def _no_mps_reason(facts: DeviceFacts) -> str:
    """Why there is no Apple GPU here; on an Apple-silicon Mac, the torch/macOS pair that has none."""
    from mps_shim.capabilities import check_mac

    macos = platform.mac_ver()[0]
    if sys.platform == "darwin" and platform.machine() == "arm64" and macos:
        why = check_mac(facts.torch, macos)
        if why:
            return f"no Apple GPU for torch here: {why}; the shim changes nothing on the CPU"
    return f"no Apple GPU ({facts.type}); the shim leaves precision and devices to the libraries"


def _capabilities(facts: DeviceFacts) -> dict:
    capabilities = facts.capabilities
    if capabilities is None:
        return {"mps": False, "reason": _no_mps_reason(facts)}
    bf16_reason = capabilities.bf16_tensor_error or "torch>=2.3 on macOS 14+"
    return {
        "mps": True,
        "probe_notes": list(facts.probe_notes),
        "bf16_tensors": {"value": capabilities.bf16_tensors, "reason": bf16_reason},
        "autocast_dtypes": {
            "value": list(capabilities.autocast_dtypes),
            "reason": "MPS autocast: fp16 from torch 2.5, bf16 from torch 2.6 on macOS 14",
        },
        "loss_scaling": {
            "value": True,
            "reason": "torch.amp.GradScaler('mps') works" if capabilities.grad_scaler
            else "torch.amp.GradScaler('mps') fails before torch 2.8; the shim scales the loss itself",
        },
        "fused_adamw": {
            "value": capabilities.fused_adamw,
            "reason": "Adam/AdamW(fused=True) run on MPS from torch 2.5 (MPS has no foreach kernels); the shim's loss "
                      "scaler unscales and skips steps itself, so fused steps are safe with it",
        },
    }


def _memory(facts: DeviceFacts, options: Options) -> dict:
    budget, reason = memory_budget(facts, options.memory_limit)
    return {
        "total_bytes": facts.memory_total_bytes,
        "recommended_max_bytes": facts.recommended_max_bytes,
        "budget_bytes": budget,
        "reason": reason,
    }


def _precision(facts: DeviceFacts, options: Options) -> dict:
    """What the upstream recipe (--bf16 --torch_dtype bfloat16) and an --fp16 run would get here."""
    choices = {}
    for label, requested in (("--bf16 --torch_dtype bfloat16", "bf16"), ("--fp16", "fp16")):
        try:
            decided = plan_precision(facts, requested, "bfloat16", forced=options.precision)
            choices[label] = {
                "chosen": decided.chosen,
                "weights_dtype": decided.weights_dtype,
                "loss_scaling": decided.loss_scaling,
                "reason": decided.reason,
            }
        except PlanError as refusal:
            choices[label] = {"chosen": None, "reason": str(refusal)}
    choices["supported"] = [p for p in ("bf16", "fp16", "fp32") if precision_support(facts, p) is None]
    return choices


def render(findings: dict) -> str:
    device = findings["device"]
    lines = [
        f"mps-shim {findings['shim_version']} on {findings['machine']['platform']}, "
        f"Python {findings['machine']['python']}",
        "libraries: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in findings["libraries"].items()),
        *findings["outside_tested_range"],
    ]
    if device is None:
        lines.append(f"device: unknown: {findings['capabilities']['reason']}")
        return "\n".join(lines)
    kind = "simulated Apple GPU" if device["simulated"] else device["type"]
    mac = f", macOS {device['macos']}" if device["macos"] else ""
    lines.append(f"device: {kind}{mac}, torch {device['torch']} behaviour")
    capabilities = findings["capabilities"]
    if not capabilities["mps"]:
        lines.append(f"capabilities: {capabilities['reason']}")
    else:
        for name in ("bf16_tensors", "autocast_dtypes", "loss_scaling", "fused_adamw"):
            entry = capabilities[name]
            value = entry["value"]
            shown = ", ".join(value) or "none" if isinstance(value, list) else ("yes" if value else "no")
            lines.append(f"{name.replace('_', ' ')}: {shown} ({entry['reason']})")
        lines += [f"probe: {note}; the probe wins" for note in capabilities["probe_notes"]]
    memory = findings["memory"]
    lines.append(
        f"memory: {size_text(memory['total_bytes'])} total, {size_text(memory['recommended_max_bytes'])} recommended "
        f"working set, budget {size_text(memory['budget_bytes'])} ({memory['reason']})"
    )
    for label, choice in findings["precision"].items():
        if label == "supported":
            continue
        chosen = choice["chosen"] or "refused"
        lines.append(f"precision for a run with {label}: {chosen} ({choice['reason']})")
    lines += _render_long_run(findings)
    return "\n".join(lines)


def _render_long_run(findings: dict) -> list[str]:
    """The known-bugs line, and with --model the CPU fallbacks of one training step."""
    lines = []
    from mps_shim.known_bugs import warning_line

    device = findings["device"]
    if device and device["type"] == "mps":
        lines.append(warning_line(device["torch"]) or f"known silent wrong-result bugs: none for torch {device['torch']}")
    probe = findings.get("cpu_fallbacks")
    if probe is not None:
        if probe["ops"] is None:
            lines.append(f"cpu fallbacks of {probe['model']}: {probe['note']}")
        else:
            ops = ", ".join(f"{op} ({n} call{'s' if n != 1 else ''})" for op, n in probe["ops"].items()) or "none"
            lines.append(f"cpu fallbacks in {probe['steps']} of {probe['model']}: {ops} ({probe['note']})")
    return lines
