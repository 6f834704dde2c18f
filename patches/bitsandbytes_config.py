"""BitsAndBytesConfig can be built where bitsandbytes is not installed, as on most Macs.

Corrects: transformers 4.40's `BitsAndBytesConfig.post_init` ends by reading bitsandbytes' installed version for
4-bit configs, so a script that builds the config for `--load_in_kbits 4` (upstream's QLoRA path) dies with
`PackageNotFoundError: No package metadata was found for bitsandbytes` before any model is loaded. Every other check
of post_init has run by then; the config is accepted, and patches/modeling.py drops it at model load where
bitsandbytes cannot run, with one line. Versions: transformers 4.40-4.5x (5.x no longer reads the version there).
"""
from __future__ import annotations

from mps_shim.registry import Patch


class BitsAndBytesConfigPatch(Patch):
    target = "transformers.utils.quantization_config"
    distribution = "transformers"
    supported = ">=4.40,<6"
    corrects = "BitsAndBytesConfig(load_in_4bit=True) needs bitsandbytes installed before any model loads"
    mac_only = True

    def apply(self, module) -> None:
        self.wrap(module.BitsAndBytesConfig, "post_init", self._post_init)

    def _post_init(self, wrapped, config, args, kwargs):
        from importlib.metadata import PackageNotFoundError

        try:
            return wrapped(*args, **kwargs)
        except PackageNotFoundError as missing:
            if "bitsandbytes" not in str(missing):
                raise
            self.runtime.report.change(
                "BitsAndBytesConfig", "needs bitsandbytes installed", "accepted without it",
                "bitsandbytes is not installed; the model will be loaded unquantized",
            )
            return None


PATCH = BitsAndBytesConfigPatch
