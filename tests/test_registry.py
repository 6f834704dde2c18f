"""The patch registry (shim/registry.py): moved targets, idempotence, exact reverts, both import orders, metadata."""
from __future__ import annotations

import ast
import json
import re
import sys
import textwrap
import types
from pathlib import Path

import pytest
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from mps_shim.registry import PATCH_MODULES, Patch, Registry
from mps_shim.report import Report
from support import REPO, clean_env, python

# A throwaway library whose newer version "moved" an attribute a patch wraps.
TARGET_SOURCE = '''
class Thing:
    def present(self):
        return "original"
'''

# The patch, in its own module so that its name (the module's) is predictable: "moved_patch".
PATCH_SOURCE = '''
from mps_shim.registry import Patch


def _wrapper(wrapped, instance, args, kwargs):
    return "patched"


class MovedPatch(Patch):
    target = "shimtest_target"
    distribution = "mps-shim"  # installed, so the warning names a real version
    supported = ">=0"
    corrects = "a test of a target that moved"

    def apply(self, module):
        self.wrap(module.Thing, "present", _wrapper)  # found: applied, then rolled back when the next one fails
        self.wrap(module.Thing, "missing", _wrapper)  # moved away in this "version"


PATCH = MovedPatch
'''


def _throwaway_library(tmp_path: Path) -> Path:
    (tmp_path / "shimtest_target.py").write_text(TARGET_SOURCE)
    (tmp_path / "moved_patch.py").write_text(PATCH_SOURCE)
    return tmp_path


def test_moved_target_warns_once_skips_and_the_shim_keeps_working(tmp_path):
    folder = _throwaway_library(tmp_path)
    code = textwrap.dedent(
        f"""
        import importlib, json, logging, sys
        sys.path.insert(0, {str(folder)!r})
        records = []

        class Keep(logging.Handler):
            def emit(self, record):
                records.append((record.levelname, record.getMessage()))

        import mps_shim
        from mps_shim import runtime
        from mps_shim.registry import Registry
        logging.getLogger("mps_shim").addHandler(Keep())
        from moved_patch import PATCH

        registry = Registry(runtime.current(), [PATCH])
        registry.install()  # the target is not imported yet: attaches on import
        import shimtest_target
        original = shimtest_target.Thing.__dict__["present"]
        import shimtest_target  # a second import statement
        registry.install()  # and a second installation, now that the target is loaded: must not warn again
        del sys.modules["shimtest_target"]
        import shimtest_target as again  # a genuinely new import of the module
        print(json.dumps({{
            "records": records,
            "status": mps_shim.report()["patches"].get("moved_patch"),
            "active": mps_shim.report()["active"],
            "present_restored": shimtest_target.Thing.__dict__["present"] is original,
            "call": shimtest_target.Thing().present(),
            "applied": registry.patches[0].applied,
            "originals_left": len(registry.patches[0]._originals),
        }}))
        """
    )
    result = python(code, check=True)
    seen = json.loads(result.stdout)
    warnings = [message for level, message in seen["records"] if level == "WARNING"]
    assert len(warnings) == 1, seen["records"]
    # The version named is the imported module's own: this test module has none, whatever mps-shim's version is.
    assert re.fullmatch(
        r"patch moved_patch skipped on mps-shim \(version unknown\): target moved: Thing\.missing", warnings[0]
    )
    on_stderr = [line for line in result.stderr.splitlines() if "moved_patch" in line]
    assert on_stderr == [f"mps-shim: {warnings[0]}"]
    assert seen["status"].startswith("skipped")
    assert "Thing.missing" in seen["status"]
    assert seen["active"] is True
    # The half-applied patch was rolled back: the attribute it did find is the original again.
    assert seen["present_restored"] is True
    assert seen["call"] == "original"
    assert seen["applied"] is False and seen["originals_left"] == 0


# --- apply / revert, in this process, on throwaway classes ---------------------------------------------------------


def _fresh_owner():
    """A module with a base class, a subclass that inherits `inherited`, and a classmethod defined on the subclass."""
    module = types.ModuleType("shimtest_owner")

    class Base:
        def inherited(self):
            return "base"

    class Child(Base):
        @classmethod
        def build(cls):
            return "built"

        def own(self):
            return "own"

    def function():
        return "function"

    module.Base, module.Child, module.function = Base, Child, function
    return module


def _make_patch(target: str):
    def wrapper(wrapped, instance, args, kwargs):
        return "patched:" + wrapped(*args, **kwargs)

    class ThrowawayPatch(Patch):
        distribution = "mps-shim"
        supported = ">=0"
        corrects = "test"
        applications = 0

        def apply(self, module):
            type(self).applications += 1
            self.wrap(module.Child, "inherited", wrapper)
            self.wrap(module.Child, "build", wrapper)
            self.wrap(module.Child, "own", wrapper)
            self.wrap(module, "function", wrapper)
            self.replace(module, "added", "new attribute")

    ThrowawayPatch.target = target
    return ThrowawayPatch


@pytest.fixture
def owner_module():
    module = _fresh_owner()
    sys.modules[module.__name__] = module
    yield module
    sys.modules.pop(module.__name__, None)


def _registry(patch_class):
    return Registry(types.SimpleNamespace(report=Report(None)), [patch_class])


def test_apply_is_idempotent(owner_module):
    registry = _registry(_make_patch(owner_module.__name__))
    registry.install()  # the module is already imported: applies at once
    patch = registry.patches[0]
    assert patch.applied and type(patch).applications == 1
    Child = owner_module.Child
    assert Child().inherited() == "patched:base" and Child.build() == "patched:built"
    after_first = {name: Child.__dict__[name] for name in ("inherited", "build", "own")}
    function_after_first = owner_module.function
    originals = list(patch._originals)

    registry.install()  # again: the hook fires at once, and must leave the applied patch alone
    registry._on_import(owner_module.__name__, owner_module)  # and a repeated import notification
    assert type(patch).applications == 1
    assert {name: Child.__dict__[name] for name in after_first} == after_first
    assert all(Child.__dict__[name] is after_first[name] for name in after_first)
    assert owner_module.function is function_after_first
    assert patch._originals == originals
    assert Child().own() == "patched:own"  # wrapped once, not twice
    assert registry.runtime.report.data["patches"] == {patch.name: "applied"}


def test_revert_restores_originals_by_identity_including_inherited(owner_module):
    Base, Child = owner_module.Base, owner_module.Child
    before = dict(vars(Child))
    base_before = dict(vars(Base))
    function = owner_module.function
    assert "inherited" not in before and not hasattr(owner_module, "added")

    registry = _registry(_make_patch(owner_module.__name__))
    registry.install()
    assert "inherited" in vars(Child)  # the wrapper was set on the subclass itself
    assert Child.__dict__["build"] is not before["build"]

    registry.uninstall()
    assert "inherited" not in vars(Child), "an inherited attribute must be removed again, not copied onto the class"
    assert Child.inherited is Base.inherited
    assert Child().inherited() == "base"
    assert set(vars(Child)) == set(before)
    assert all(vars(Child)[name] is value for name, value in before.items())
    assert all(vars(Base)[name] is value for name, value in base_before.items())
    assert Child.__dict__["build"] is before["build"]  # the classmethod descriptor itself, not an equal one
    assert owner_module.function is function
    assert not hasattr(owner_module, "added")
    assert registry.patches[0].applied is False

    registry.uninstall()  # reverting twice is harmless
    assert Child.inherited is Base.inherited and owner_module.function is function


def test_two_patches_wrapping_the_same_attribute_revert_to_the_original(owner_module):
    # Two patches may wrap one attribute: whichever order the registry lists them in, uninstalling must end on the
    # original, not on the first patch's wrapper.
    first, second = _make_patch(owner_module.__name__), _make_patch(owner_module.__name__)
    own = vars(owner_module.Child)["own"]
    function = owner_module.function
    registry = Registry(types.SimpleNamespace(report=Report(None)), [first, second])
    registry.install()
    assert owner_module.Child().own() == "patched:patched:own"
    registry.uninstall()
    assert vars(owner_module.Child)["own"] is own
    assert owner_module.function is function
    assert "inherited" not in vars(owner_module.Child) and not hasattr(owner_module, "added")


# --- import order, in subprocesses, with the real patches -----------------------------------------------------------

ORDER_CHECK = """
import json, wrapt
import mps_shim
from mps_shim import runtime
patch = {p.name: p for p in runtime.current().registry.patches}
report = mps_shim.report()["patches"]
print(json.dumps({
    "autocast_status": report.get("autocast"),
    "training_args_status": report.get("training_args"),
    "autocast_wrapped": isinstance(vars(torch.amp.autocast_mode.autocast)["__init__"], wrapt.FunctionWrapper),
    "post_init_wrapped": isinstance(vars(transformers.training_args.TrainingArguments)["__post_init__"],
                                    wrapt.FunctionWrapper),
    "throwaway": shimtest_target.Thing().present(),
}))
"""

LATE_PATCH_SOURCE = '''
from mps_shim.registry import Patch


def _wrapper(wrapped, instance, args, kwargs):
    return "patched"


class LatePatch(Patch):
    target = "shimtest_target"
    distribution = "mps-shim"
    supported = ">=0"
    corrects = "test"

    def apply(self, module):
        self.wrap(module.Thing, "present", _wrapper)


PATCH = LatePatch
'''


@pytest.mark.parametrize("order", ["target imported after activation", "target imported before activation"])
def test_patches_attach_in_either_import_order(tmp_path, order):
    (tmp_path / "shimtest_target.py").write_text(TARGET_SOURCE)
    (tmp_path / "late_patch.py").write_text(LATE_PATCH_SOURCE)
    imports = "import torch, transformers.training_args, shimtest_target"
    activation = textwrap.dedent(
        """
        import mps_shim
        from mps_shim import runtime
        from mps_shim.registry import Registry
        from late_patch import PATCH
        extra = Registry(runtime.current(), [PATCH]); extra.install()
        """
    )
    before_hook = "import sys\nsys.modules.get('torch') is None or sys.exit('torch imported too early')\n"
    body = [activation, before_hook, imports] if order.endswith("after activation") else [imports, activation]
    code = f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\n" + "\n".join(body) + "\nimport torch, transformers\n"
    code += ORDER_CHECK
    seen = json.loads(python(code, env=clean_env(MPS_SHIM_SIMULATE="1"), check=True).stdout)
    assert seen == {
        "autocast_status": "applied",
        "training_args_status": "applied",
        "autocast_wrapped": True,
        "post_init_wrapped": True,
        "throwaway": "patched",
    }


# --- deactivate() with every real patch ------------------------------------------------------------------------------

DEACTIVATE_SCRIPT = r"""
import inspect, json, sys
import torch, transformers, transformers.trainer, accelerate, peft, torch.distributed.run
import transformers.utils, transformers.hf_argparser, transformers.training_args, transformers.modeling_utils
import transformers.utils.quantization_config
import accelerate.accelerator, torch.nn.functional, torch.amp.autocast_mode

MISSING = object()
# Everything the patches could touch, snapshotted before the shim exists: every module a patch targets or reaches
# into, and every class those modules hold.
modules = [m for name, m in sorted(sys.modules.items())
           if m is not None and name.split(".")[0] in ("torch", "transformers", "accelerate", "peft")
           and name in (
               "torch", "torch.nn.functional", "torch.amp.autocast_mode", "torch.distributed.run",
               "transformers", "transformers.utils", "transformers.hf_argparser", "transformers.training_args",
               "transformers.utils.quantization_config",
               "transformers.modeling_utils", "transformers.trainer", "accelerate.accelerator", "peft",
               "peft.peft_model", "peft.utils.other")]
owners = {}
for module in modules:
    owners[id(module)] = module
    for value in list(vars(module).values()):
        if inspect.isclass(value):
            owners[id(value)] = value
snapshot = {key: dict(vars(owner)) for key, owner in owners.items()}

import mps_shim  # activates (MPS_SHIM_SIMULATE=1): every target is already imported, so every patch applies now
from mps_shim import runtime

def wrapped_pairs():
    pairs = []
    for patch in runtime.current().registry.patches:
        for owner, name, _original, _had in patch._originals:
            pairs.append((patch.name, owner, name))
    return pairs

def current(owner, name):
    return vars(owner).get(name, MISSING)

problems = []
pairs = wrapped_pairs()
statuses = dict(mps_shim.report()["patches"])
for patch_name, owner, name in pairs:
    if id(owner) not in snapshot:
        problems.append(f"{patch_name}: {owner!r}.{name} was not snapshotted")
    elif current(owner, name) is snapshot[id(owner)].get(name, MISSING):
        problems.append(f"{patch_name}: {owner!r}.{name} is not replaced while active")

mps_shim.deactivate()
report_after = mps_shim.report()
for patch_name, owner, name in pairs:
    if id(owner) in snapshot and current(owner, name) is not snapshot[id(owner)].get(name, MISSING):
        problems.append(f"{patch_name}: {owner!r}.{name} is not the original after deactivate")
# Nothing else on those owners may have been left behind either (the simulator's own changes included).
for key, before in snapshot.items():
    owner = owners[key]
    after = vars(owner)
    for name, value in before.items():
        if after.get(name, MISSING) is not value:
            problems.append(f"{owner!r}.{name} differs after deactivate")
    if not inspect.ismodule(owner):  # modules legitimately gain attributes when submodules load
        for name in set(after) - set(before):
            problems.append(f"{owner!r}.{name} left behind after deactivate")

mps_shim.activate()
again = wrapped_pairs()
reapplied = [f"{p}:{n}" for p, owner, n in again if current(owner, n) is not snapshot[id(owner)].get(n, MISSING)]
print(json.dumps({
    "pairs": sorted(f"{p}:{getattr(o, '__qualname__', getattr(o, '__name__', o))}.{n}" for p, o, n in pairs),
    "statuses": statuses,
    "problems": problems,
    "active_after_deactivate": report_after["active"],
    "active_after_reactivate": mps_shim.report()["active"],
    "again": sorted(f"{p}:{n}" for p, o, n in again),
    "reapplied": sorted(reapplied),
}))
"""


def test_deactivate_restores_every_original_of_the_real_patches():
    result = python(DEACTIVATE_SCRIPT, env=clean_env(MPS_SHIM_SIMULATE="1"), timeout=300, check=True)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["problems"] == []
    applied = {name for name, status in seen["statuses"].items() if status == "applied"}
    # On a simulated modern Mac with every target imported, these patches must have applied and wrapped something.
    assert {"autocast", "training_args", "modeling", "trainer", "accelerate_unscale", "peft_loading",
            "hf_argparser", "torchrun"} <= applied, seen["statuses"]
    wrapped_by = {pair.split(":")[0] for pair in seen["pairs"]}
    assert applied <= wrapped_by, f"applied but recorded nothing to revert: {applied - wrapped_by}"
    assert "trainer:Trainer.train" in seen["pairs"]
    assert "autocast:autocast.__init__" in seen["pairs"]
    assert seen["active_after_deactivate"] is False
    assert seen["active_after_reactivate"] is True
    assert seen["again"] and seen["again"] == sorted(p.split(":")[0] + ":" + p.rsplit(".", 1)[-1] for p in seen["pairs"])
    assert seen["reapplied"] == seen["again"]


# --- what every patch module declares --------------------------------------------------------------------------------

PATCH_FILES = sorted(p.stem for p in (REPO / "patches").glob("*.py") if p.stem != "__init__")


def test_every_patch_module_is_registered():
    assert sorted(PATCH_MODULES) == PATCH_FILES
    assert len(set(PATCH_MODULES)) == len(PATCH_MODULES)


@pytest.mark.parametrize("name", PATCH_FILES)
def test_patch_module_declares_its_target_versions_and_purpose(name):
    import importlib

    module = importlib.import_module(f"mps_shim.patches.{name}")
    patch = module.PATCH
    assert isinstance(patch, type) and issubclass(patch, Patch) and patch is not Patch
    for field in ("target", "distribution", "supported", "corrects"):
        value = getattr(patch, field, None)
        assert isinstance(value, str) and value.strip(), f"{name}.PATCH.{field} is empty"
    assert PATCH_MODULES[name] == patch.target, "the registry loads the module on the import of its declared target"
    try:
        specifier = SpecifierSet(patch.supported)
    except InvalidSpecifier as error:
        pytest.fail(f"{name}.PATCH.supported={patch.supported!r} is not PEP 440: {error}")
    assert len(specifier) >= 1, f"{name}.PATCH.supported={patch.supported!r} constrains nothing"
    assert re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*", patch.target), patch.target
    assert patch.apply is not Patch.apply, f"{name}.PATCH does not implement apply"
    docstring = ast.get_docstring(ast.parse((REPO / "patches" / f"{name}.py").read_text()))
    assert docstring, f"patches/{name}.py has no module docstring"
    assert re.search(r"Versions: [^\n]*\d+\.(\d+|x)", docstring), f"patches/{name}.py's docstring names no versions"
    assert patch.distribution.split("-")[0] in docstring.split("Versions:")[1].lower(), (
        f"patches/{name}.py's Versions line does not name {patch.distribution}"
    )
