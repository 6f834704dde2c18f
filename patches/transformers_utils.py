"""`from transformers.utils import send_example_telemetry` works again.

Corrects: transformers 5.0 removed `send_example_telemetry` (it only reported example-script usage to the Hub), so
scripts written from the Hugging Face examples, upstream's SFT and pretraining scripts among them, stop with an
ImportError at their first line. The shim puts back a function that does nothing. Not MPS-specific: applies on every
machine where the name is missing. Versions: transformers 5.x (4.x still has it; nothing is changed there).
"""
from __future__ import annotations

from mps_shim.registry import Patch


def send_example_telemetry(*args, **kwargs) -> None:
    """Stand-in for the function transformers 5 removed: usage telemetry, so doing nothing loses nothing."""


class TelemetryPatch(Patch):
    target = "transformers.utils"
    distribution = "transformers"
    supported = ">=4.40,<6"
    corrects = "transformers 5 removed send_example_telemetry; example-derived scripts fail to import"

    def applies(self, module) -> bool:
        return not hasattr(module, "send_example_telemetry")

    def apply(self, module) -> None:
        self.replace(module, "send_example_telemetry", send_example_telemetry)
        self.runtime.report.change(
            "transformers.utils.send_example_telemetry", "missing", "no-op",
            "removed in transformers 5; it only sent usage telemetry",
        )


PATCH = TelemetryPatch
