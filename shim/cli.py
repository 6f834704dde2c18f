"""The `mps-shim` command (interface.md sections 1-3).

    mps-shim [OPTIONS] PROGRAM [ARGS]...     run PROGRAM with the shim (also: mps-shim run PROGRAM ...)
    mps-shim [OPTIONS] doctor [--json]       what this machine can do and what the shim would choose
    mps-shim [OPTIONS] plan PROGRAM [ARGS]   run PROGRAM up to where training would start, print the plan, exit 0
"""
from __future__ import annotations

import json
import os
import sys

import click

from mps_shim.config import ENV, PLAN_ONLY, PRECISIONS, ShimConfigError, load_options, parse_option
from mps_shim.launcher import LaunchError, exec_program, is_python_script, prepare_environment, run_script
from mps_shim.plan import PlanError

_OPTION_HELP = {
    "precision": f"Mixed precision: {', '.join(PRECISIONS)} (default auto).",
    "memory_limit": "Memory budget, e.g. 12GiB, 800MiB or bytes (default: what the device recommends).",
    "simulate": "Simulate an Apple GPU: 1, or e.g. macos=13.6,torch=2.2,memory=16GiB.",
    "report": "Write the JSON report to this file.",
    "log_level": "quiet, info or debug (default info).",
}


def _shared_options(command):
    for name in reversed(list(ENV)):
        flag = "--" + name.replace("_", "-")
        command = click.option(flag, name, default=None, metavar="VALUE", help=f"{_OPTION_HELP[name]} [{ENV[name]}]")(
            command
        )
    return command


class _ProgramFirstGroup(click.Group):
    """A group whose unknown first word is the program to run: `mps-shim train.py` means `mps-shim run train.py`."""

    def resolve_command(self, ctx, args):
        if args and args[0] in self.commands:
            return super().resolve_command(ctx, args)
        return "run", self.commands["run"], args


def _resolve(ctx: click.Context, given: dict) -> dict:
    """Options from the group and the subcommand (the subcommand's win), validated with the flag's name."""
    merged = {**(ctx.obj or {}), **{k: v for k, v in given.items() if v is not None}}
    return {name: parse_option(name, value, "--" + name.replace("_", "-")) for name, value in merged.items()}


_PASS_THROUGH = {"ignore_unknown_options": True, "allow_interspersed_args": False}


@click.group(cls=_ProgramFirstGroup, context_settings={"allow_interspersed_args": False})
@_shared_options
@click.version_option(package_name="mps-shim", prog_name="mps-shim")
@click.pass_context
def cli(ctx, **given):
    """Run unmodified Hugging Face training scripts on Apple-silicon Macs."""
    ctx.obj = {k: v for k, v in given.items() if v is not None}


@cli.command(context_settings=_PASS_THROUGH, add_help_option=False)
@click.argument("program")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(ctx, program, args):
    """Run PROGRAM [ARGS]... with the shim active in it and in every Python process it starts."""
    return _launch(_resolve(ctx, {}), program, list(args))


@cli.command(context_settings=_PASS_THROUGH, add_help_option=False)
@click.argument("program")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def plan(ctx, program, args):
    """Run PROGRAM up to where training would start, print every change and the memory plan, exit 0."""
    os.environ[PLAN_ONLY] = "1"
    return _launch(_resolve(ctx, {}), program, list(args))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_shared_options
@click.pass_context
def doctor(ctx, as_json, **given):
    """The machine, library versions, device capabilities and the precision the shim would choose, with reasons."""
    from mps_shim.doctor import diagnose, render

    options = load_options(**_resolve(ctx, given))
    findings = diagnose(options)
    click.echo(json.dumps(findings, indent=2) if as_json else render(findings))


def _launch(options: dict, program: str, args: list[str]):
    """What to do once click is done: launching happens outside click so Ctrl-C and exit codes are the program's."""

    def launch():
        from mps_shim.config import kill_switch

        resolved = load_options(**options)
        if not kill_switch():
            _check_precision_before_launch(resolved)
            prepare_environment(resolved)
        if is_python_script(program):
            import mps_shim

            mps_shim.activate(**options)
            run_script(program, args)
        else:
            exec_program(program, args)

    return launch


def _check_precision_before_launch(options) -> None:
    """A forced precision this Mac cannot run is refused here, before the program starts any work."""
    if options.precision == "auto":
        return
    from mps_shim.device import detect
    from mps_shim.plan import check_forced_precision

    check_forced_precision(detect(options), options.precision)  # detect imports torch only off simulation


def main(argv: list[str] | None = None) -> None:
    try:
        action = cli.main(args=argv, prog_name="mps-shim", standalone_mode=False)
        if callable(action):
            action()
        elif isinstance(action, int):
            sys.exit(action)
    except (ShimConfigError, PlanError) as error:
        click.echo(f"mps-shim: {error}", err=True)
        sys.exit(2)
    except LaunchError as error:
        click.echo(f"mps-shim: {error}", err=True)
        sys.exit(error.exit_code)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
