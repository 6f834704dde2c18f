"""Patches and the registry that attaches them when their target module is imported.

Modelled on OpenTelemetry's instrumentors and wrapt's post-import hooks: each module under `patches/` declares one
`Patch` subclass with the module it targets, the distribution and versions it was written against, and why it
exists. The registry never imports a target itself: it registers a post-import hook, so a patch attaches the moment
its target is imported, or at once if it already is. Applying and reverting are idempotent. A target that is missing
or has moved (an unknown version) gives one warning and the patch is skipped, never a crash.
"""
from __future__ import annotations

import importlib

from mps_shim.hooks import when_imported
from mps_shim.log import DEBUG, WARNING, emit

TYPE_CHECKING = False  # typing itself is not imported: `import mps_shim` runs at the start of every process
if TYPE_CHECKING:
    from typing import Any, Callable, ClassVar

    from mps_shim.runtime import Runtime


# Each patch module and the module whose import attaches it (the same target its PATCH declares; a test checks they
# agree). The registry imports a patch module only when its target is imported, so `import mps_shim` stays cheap.
# Adding a patch means adding a module and its line here; the order is the order patches on one target apply in.
PATCH_MODULES = {
    "autocast": "torch",
    "sdpa": "torch",
    "torchrun": "torch.distributed.run",
    "transformers_utils": "transformers.utils",
    "hf_argparser": "transformers.hf_argparser",
    "training_args": "transformers.training_args",
    "bitsandbytes_config": "transformers.utils.quantization_config",
    "modeling": "transformers.modeling_utils",
    "trainer": "transformers.trainer",
    "accelerate_unscale": "accelerate.accelerator",
    "peft_loading": "peft",
}


class TargetMoved(Exception):
    """The patch's target is not where this version of the library keeps it."""


class Patch:
    """One patched target. Subclasses set the class attributes and implement `apply` (and `applies` if needed)."""

    target: ClassVar[str]  # the module whose import attaches the patch
    distribution: ClassVar[str]  # the installed package whose version matters
    supported: ClassVar[str]  # versions it was written and tested against, a PEP 440 specifier
    corrects: ClassVar[str]  # the upstream behaviour it corrects, one line
    mac_only: ClassVar[bool] = False  # True: only on an Apple GPU (real or simulated); False: on every machine too

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._originals: list[tuple[Any, str, Any, bool]] = []
        self.applied = False

    @property
    def name(self) -> str:
        return type(self).__module__.rsplit(".", 1)[-1]

    def applies(self, module) -> bool:
        """Whether this machine and this version of the target need the patch (never decided from the user's script)."""
        return not self.mac_only or self.runtime.changes_numbers

    def apply(self, module) -> None:
        raise NotImplementedError

    def attribute(self, owner: Any, name: str) -> Any:
        """The attribute a patch needs, or TargetMoved naming it."""
        try:
            return getattr(owner, name)
        except AttributeError:
            raise TargetMoved(f"{getattr(owner, '__name__', owner)}.{name}") from None

    def wrap(self, owner: Any, name: str, wrapper: Callable) -> None:
        """Wrap owner.name with a wrapt wrapper `wrapper(wrapped, instance, args, kwargs)`, to be undone by revert."""
        import wrapt  # here, not at the top: it is costly to import and only needed once a target is loaded

        self.attribute(owner, name)
        self._remember(owner, name)
        wrapt.wrap_function_wrapper(owner, name, wrapper)

    def replace(self, owner: Any, name: str, value: Any) -> None:
        """Set owner.name to value (a plain attribute, e.g. a dataclass field default), to be undone by revert."""
        self._remember(owner, name)
        setattr(owner, name, value)

    def _remember(self, owner: Any, name: str) -> None:
        # Only what the owner itself holds is restored; an inherited attribute is removed again on revert.
        had = name in vars(owner)
        self._originals.append((owner, name, vars(owner).get(name), had))

    def revert(self) -> None:
        for owner, name, original, had in reversed(self._originals):
            if had:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self._originals.clear()
        self.applied = False

    def version_supported(self, version: str | None) -> bool:
        from mps_shim.versions import version_matches

        return version_matches(version, self.supported)


class Registry:
    """The patches of one activation; attaches each on its target's import, reverts all on deactivate."""

    def __init__(self, runtime: Runtime, patch_classes: list[type[Patch]] | None = None):
        self.runtime = runtime
        self.patches = [cls(runtime) for cls in patch_classes or ()]
        # patch modules not imported yet, by name -> target (all of PATCH_MODULES unless the caller chose patches)
        self._unloaded = dict(PATCH_MODULES) if patch_classes is None else {}
        self._applied: list[Patch] = []  # in the order they were applied, which is the order of their targets' imports
        self.active = False
        self._versions_said: set[str] = set()

    def install(self) -> None:
        self.active = True
        targets = [*self._unloaded.values(), *(patch.target for patch in self.patches)]
        for target in dict.fromkeys(targets):
            when_imported(target, lambda module, target=target: self._on_import(target, module))

    def _on_import(self, target: str, module) -> None:
        if not self.active:  # a hook left by an earlier activation: hooks cannot be withdrawn, only ignored
            return
        for name in [name for name, each in self._unloaded.items() if each == target]:
            del self._unloaded[name]
            try:
                self.patches.append(importlib.import_module(f"mps_shim.patches.{name}").PATCH(self.runtime))
            except Exception as error:  # a broken patch module must not take the user's import down with it
                self.runtime.report.note(f"patch {name} not loaded: {type(error).__name__}: {error}", WARNING)
        for patch in self.patches:
            if patch.target == target and not patch.applied:
                self._say_if_untested(patch.distribution, module)
                self._apply(patch, module)

    def _say_if_untested(self, distribution: str, module) -> None:
        """One line per patched library outside the tested range, the first time one of its targets is imported."""
        from mps_shim.versions import module_version, out_of_range_line

        if distribution in self._versions_said:
            return
        self._versions_said.add(distribution)
        line = out_of_range_line(distribution, module_version(module))
        if line:
            self.runtime.report.note(line, level=WARNING)

    def _apply(self, patch: Patch, module) -> None:
        from mps_shim.versions import module_version

        report = self.runtime.report
        installed = module_version(module)  # the one imported: a script's vendored copy is not the installed one
        try:
            if not patch.applies(module):
                report.record_patch(patch.name, "not needed")
                return
            patch.apply(module)
            patch.applied = True
            self._applied.append(patch)
            report.record_patch(patch.name, "applied")
            if not patch.version_supported(installed):
                emit(DEBUG, "patch %s applied to untested %s %s", patch.name, patch.distribution, installed)
        except Exception as error:  # a moved target must never crash the user's run
            patch.revert()
            report.record_patch(patch.name, f"skipped: {error}")
            reason = "target moved" if isinstance(error, TargetMoved) else type(error).__name__
            report.note(
                f"patch {patch.name} skipped on {patch.distribution} {installed or '(version unknown)'}: "
                f"{reason}: {error}",
                level=WARNING,
            )

    def uninstall(self) -> None:
        self.active = False
        # Last applied, first reverted: two patches may wrap the same attribute, and each restores what it found, so
        # only the reverse order ends on the original.
        for patch in [*reversed(self._applied), *(p for p in self.patches if p not in self._applied)]:
            patch.revert()
        self._applied.clear()
