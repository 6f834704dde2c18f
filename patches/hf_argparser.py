"""Training arguments that transformers renamed or removed, accepted as upstream's scripts pass them.

Corrects: HfArgumentParser stops with "Some specified arguments are not used by the HfArgumentParser" for any flag
the installed TrainingArguments lacks, so upstream's run_sft.sh dies in argument parsing on current transformers:
- `--evaluation_strategy`: removed in 4.51 (`--eval_strategy` since 4.41);
- `--warmup_ratio`: removed in 5.x (`--warmup_steps` takes a ratio below 1 since then);
- `--no_cuda`: removed in 5.0 (`--use_cpu` since 4.36);
- `--overwrite_output_dir`: removed in 5.x with nothing in its place; the value is still set on the parsed arguments
  because scripts read it (upstream's checkpoint detection does).
A new name is also taken back to the old one on versions that predate it. Not MPS-specific: applies on every
machine. Versions: transformers 4.40-5.x.
"""
from __future__ import annotations

import sys

from mps_shim.registry import Patch

# (old name, new name): whichever of the two the installed dataclasses have is used.
RENAMED = (("evaluation_strategy", "eval_strategy"), ("warmup_ratio", "warmup_steps"), ("no_cuda", "use_cpu"))
# Removed flags that scripts still read from the parsed arguments.
REMOVED_FLAGS = ("overwrite_output_dir",)
BOOLEAN_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _field_names(dataclass_types) -> set[str]:
    import dataclasses  # transformers has loaded it by now; importing it here keeps `import mps_shim` light

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


def adapt_argv(argv: list[str], renames: dict[str, str], removed: tuple[str, ...]):
    """(argv with renamed flags, {removed flag: its boolean value}, [(old, new)] renamed)."""
    adapted, kept_aside, renamed = [], {}, []
    arguments = iter(enumerate(argv))
    for index, argument in arguments:
        flag, equals, value = argument.partition("=")
        name = flag[2:] if flag.startswith("--") else None
        if name in removed:
            if not equals and index + 1 < len(argv) and argv[index + 1].lower() in BOOLEAN_WORDS:
                value = next(arguments)[1]
            kept_aside[name] = BOOLEAN_WORDS.get(value.lower(), True) if value else True
            continue
        if name in renames:
            renamed.append((name, renames[name]))
            argument = f"--{renames[name]}{equals}{value}"
        adapted.append(argument)
    return adapted, kept_aside, renamed


class HfArgumentParserPatch(Patch):
    target = "transformers.hf_argparser"
    distribution = "transformers"
    supported = ">=4.40,<6"
    corrects = "flags renamed or removed by newer transformers stop argument parsing"

    def apply(self, module) -> None:
        self.wrap(module.HfArgumentParser, "parse_args_into_dataclasses", self._parse_args)
        self.wrap(module.HfArgumentParser, "parse_dict", self._parse_dict)

    def _removed(self, parser) -> tuple[str, ...]:
        names = _field_names(parser.dataclass_types)
        return tuple(flag for flag in REMOVED_FLAGS if flag not in names)

    def _record(self, renamed, kept_aside) -> None:
        change = self.runtime.report.change
        for old, new in renamed:
            change("training argument", f"--{old}", f"--{new}", "renamed by the installed transformers")
        for name in kept_aside:
            change(
                "training argument", f"--{name}", f"attribute {name} only",
                "removed by the installed transformers; kept on the parsed arguments for the script to read",
            )

    @staticmethod
    def _set_aside(outputs, kept_aside: dict) -> None:
        for output in outputs:
            if hasattr(output, "output_dir"):  # the TrainingArguments among the parsed dataclasses
                for name, value in kept_aside.items():
                    setattr(output, name, value)

    def _parse_args(self, wrapped, parser, args, kwargs):
        given = kwargs.get("args", args[0] if args else None)
        argv = list(sys.argv[1:] if given is None else given)
        adapted, kept_aside, renamed = adapt_argv(argv, renames_for(parser.dataclass_types), self._removed(parser))
        if adapted == argv:
            return wrapped(*args, **kwargs)
        self._record(renamed, kept_aside)
        outputs = wrapped(*args[1:], **{**kwargs, "args": adapted})
        self._set_aside(outputs, kept_aside)
        return outputs

    def _parse_dict(self, wrapped, parser, args, kwargs):
        # parse_json_file and parse_yaml_file both end here.
        values = dict(kwargs.get("args", args[0] if args else {}))
        renames = renames_for(parser.dataclass_types)
        kept_aside = {name: bool(values.pop(name)) for name in self._removed(parser) if name in values}
        renamed = [(key, renames[key]) for key in values if key in renames]
        if not renamed and not kept_aside:
            return wrapped(*args, **kwargs)
        self._record(renamed, kept_aside)
        values = {renames.get(key, key): value for key, value in values.items()}
        outputs = wrapped(*args[1:], **{**kwargs, "args": values})
        self._set_aside(outputs, kept_aside)
        return outputs


PATCH = HfArgumentParserPatch
