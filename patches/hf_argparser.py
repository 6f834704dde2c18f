"""Training arguments renamed by transformers, accepted under either name.

Corrects: `--evaluation_strategy` was removed in transformers 4.51 (renamed `--eval_strategy` in 4.41), and `--no_cuda`
in 5.0 (`--use_cpu` since 4.36). HfArgumentParser then stops with "Some specified arguments are not used by the
HfArgumentParser", so upstream's run_sft.sh dies in argument parsing before anything runs. Old names are rewritten to
whatever the installed TrainingArguments has (and new ones back, on versions that predate them). Not MPS-specific:
applies on every machine. Versions: transformers 4.40-5.x.
"""
from __future__ import annotations

import dataclasses
import sys

from mps_shim.registry import Patch

# (old name, new name): one of the two exists in every transformers version the shim supports.
RENAMED = (("evaluation_strategy", "eval_strategy"), ("no_cuda", "use_cpu"))


def _field_names(dataclass_types) -> set[str]:
    return {f.name for cls in dataclass_types if dataclasses.is_dataclass(cls) for f in dataclasses.fields(cls)}


def renames_for(dataclass_types) -> dict[str, str]:
    """{name the run used: name the installed dataclasses have} for every renamed argument."""
    names = _field_names(dataclass_types)
    renames = {}
    for old, new in RENAMED:
        if new in names and old not in names:
            renames[old] = new
        elif old in names and new not in names:
            renames[new] = old
    return renames


def rename_argv(argv: list[str], renames: dict[str, str]) -> list[str]:
    renamed = []
    for argument in argv:
        flag, equals, value = argument.partition("=")
        name = flag[2:] if flag.startswith("--") else None
        if name in renames:
            argument = f"--{renames[name]}{equals}{value}"
        renamed.append(argument)
    return renamed


class HfArgumentParserPatch(Patch):
    target = "transformers.hf_argparser"
    distribution = "transformers"
    supported = ">=4.40,<6"
    corrects = "--evaluation_strategy (gone in 4.51) and --no_cuda (gone in 5.0) stop argument parsing"

    def apply(self, module) -> None:
        self.wrap(module.HfArgumentParser, "parse_args_into_dataclasses", self._parse_args)
        self.wrap(module.HfArgumentParser, "parse_dict", self._parse_dict)

    def _record(self, old: str, new: str) -> None:
        self.runtime.report.change(
            f"argument --{old}", f"--{old}", f"--{new}", "renamed by the installed transformers"
        )

    def _parse_args(self, wrapped, parser, args, kwargs):
        renames = renames_for(parser.dataclass_types)
        given = kwargs.get("args", args[0] if args else None)
        argv = list(sys.argv[1:] if given is None else given)
        renamed = rename_argv(argv, renames)
        if renamed != argv:
            for before, after in zip(argv, renamed):
                if before != after:
                    self._record(before.partition("=")[0][2:], after.partition("=")[0][2:])
            kwargs = {**kwargs, "args": renamed}
            args = args[1:]
        return wrapped(*args, **kwargs)

    def _parse_dict(self, wrapped, parser, args, kwargs):
        # parse_json_file and parse_yaml_file both end here.
        values = kwargs.get("args", args[0] if args else {})
        renames = renames_for(parser.dataclass_types)
        if any(key in renames for key in values):
            for key in values:
                if key in renames:
                    self._record(key, renames[key])
            values = {renames.get(key, key): value for key, value in values.items()}
            kwargs = {**kwargs, "args": values}
            args = args[1:]
        return wrapped(*args, **kwargs)


PATCH = HfArgumentParserPatch
