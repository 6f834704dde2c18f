"""Installs two files at the top of site-packages, outside the packages: the `MPS_SHIM=1` start-up hook (a .pth
file) and mps_shim_entry.py, the module the hook and the `mps-shim` command import before the mps_shim package
(shim/mps_shim_entry.py says why).

pyproject.toml carries the metadata; this file exists only because setuptools' declarative config cannot place a
file outside the packages. `pip install .` goes through build_py; `pip install -e .` through editable_wheel, which
ignores build_lib, so each command writes the files where its wheel is assembled (copies, also when editable).
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HERE = Path(__file__).parent
TOP_LEVEL = (HERE / "shim" / "mps_shim_hook.pth", HERE / "shim" / "mps_shim_entry.py")


def write_top_level(folder: str) -> None:
    for source in TOP_LEVEL:
        (Path(folder) / source.name).write_text(source.read_text())


class BuildPyWithHook(build_py):
    def run(self):
        super().run()
        write_top_level(self.build_lib)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), *(str(Path(self.build_lib) / s.name) for s in TOP_LEVEL)]


class EditableWheelWithHook(editable_wheel):
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        outputs = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        write_top_level(unpacked_wheel)
        return outputs


setup(cmdclass={"build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook})
