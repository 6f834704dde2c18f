"""Installs the `MPS_SHIM=1` start-up hook, a .pth file at the top of site-packages.

pyproject.toml carries the metadata; this file exists only because setuptools' declarative config cannot place a
file outside the packages. `pip install .` goes through build_py; `pip install -e .` through editable_wheel, which
ignores build_lib, so each command writes the hook where its wheel is assembled.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HOOK = Path(__file__).parent / "shim" / "mps_shim_hook.pth"


class BuildPyWithHook(build_py):
    def run(self):
        super().run()
        (Path(self.build_lib) / HOOK.name).write_text(HOOK.read_text())

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / HOOK.name)]


class EditableWheelWithHook(editable_wheel):
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        outputs = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        (Path(unpacked_wheel) / HOOK.name).write_text(HOOK.read_text())
        return outputs


setup(cmdclass={"build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook})
