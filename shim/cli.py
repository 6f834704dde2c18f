"""The `mps-shim` command (docs/user-contract.md).

    mps-shim [OPTIONS] PROGRAM [ARGS]...     run PROGRAM with the shim (also: mps-shim run PROGRAM ...)
    mps-shim [OPTIONS] doctor [--json]       what this machine can do and what the shim would choose
    mps-shim [OPTIONS] plan PROGRAM [ARGS]   run PROGRAM up to where training would start, print the plan, exit 0

This module and shim/startup.py are the only places that turn the shim's exceptions (shim/errors.py) into one line
on stderr and an exit status.
"""
from __future__ import annotations

import json
import os
import sys

import click

from mps_shim.config import ENV, PLAN_ONLY, PRECISIONS, flag, kill_switch, load_options, source_of
from mps_shim.errors import PlanReached, ShimConfigError, ShimError
from mps_shim.launcher import exec_program, find_program, is_python_script, prepare_environment, run_script

_OPTION_HELP = {
    "precision": f"Mixed precision: {', '.join(PRECISIONS)} (default auto).",
    "memory_limit": "Memory budget, e.g. 12GiB, 800MiB or bytes (default: what the device recommends).",
    "simulate": "Simulate an Apple GPU: 1, or e.g. macos=13.6,torch=2.2,memory=16GiB.",
    "report": "Write the JSON report to this file (doctor: its findings).",
    "log_level": "quiet, info or debug (default info).",
}


def _shared_options(command):
    for name in reversed(list(ENV)):
        help_text = f"{_OPTION_HELP[name]} [{ENV[name]}]"
        command = click.option(flag(name), name, default=None, metavar="VALUE", help=help_text)(command)
    return command


class _ProgramFirstGroup(click.Group):
    """A group whose unknown first word is the program to run: `mps-shim train.py` means `mps-shim run train.py`."""

    def resolve_command(self, ctx, args):
        if args and args[0] in self.commands:
            return super().resolve_command(ctx, args)
        return "run", self.commands["run"], args


class _ProgramCommand(click.Command):
    """`run` and `plan`: everything after PROGRAM is the program's own, `--help` included; `--help` in the place of
    PROGRAM is ours."""

    def parse_args(self, ctx, args):
        if args[:1] in (["--help"], ["-h"]):
            click.echo(ctx.get_help())
            ctx.exit(0)
        return super().parse_args(ctx, args)


def _given(ctx: click.Context, given: dict) -> dict:
    """Options from the group and the subcommand (the subcommand's win), as typed; judged by load_options."""
    return {**(ctx.obj or {}), **{k: v for k, v in given.items() if v is not None}}


_PASS_THROUGH = {"ignore_unknown_options": True, "allow_interspersed_args": False}


@click.group(cls=_ProgramFirstGroup, context_settings={"allow_interspersed_args": False})
@_shared_options
@click.version_option(package_name="mps-shim", prog_name="mps-shim")
@click.pass_context
def cli(ctx, **given):
    """Run unmodified Hugging Face training scripts on Apple-silicon Macs."""
    ctx.obj = {k: v for k, v in given.items() if v is not None}


@cli.command(cls=_ProgramCommand, context_settings=_PASS_THROUGH, add_help_option=False)
@click.argument("program")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(ctx, program, args):
    """Run PROGRAM [ARGS]... with the shim active in it and in every Python process it starts."""
    return _launch(_given(ctx, {}), program, list(args))


@cli.command(cls=_ProgramCommand, context_settings=_PASS_THROUGH, add_help_option=False)
@click.option("--mac-sizes", default=None, metavar="SIZES",
              help="Size the run for these Macs, e.g. 8GB,16GB,24GB (as sold; default: this Mac). [MPS_SHIM_PLAN_SIZES]")
@click.argument("program")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def plan(ctx, mac_sizes, program, args):
    """Run PROGRAM up to where training would start, print every change and the memory plan, exit 0."""
    from mps_shim.sizing import PLAN_SIZES, parse_mac_sizes, plan_sizes

    if mac_sizes is not None:
        parse_mac_sizes(mac_sizes, "--mac-sizes")  # a bad size stops here, before any work
        os.environ[PLAN_SIZES] = mac_sizes  # for every process the program starts (shim/sizing.py)
    else:
        plan_sizes(os.environ)
    return _launch(_given(ctx, {}), program, list(args), plan_only=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--model", "model", default=None, metavar="PATH",
              help="Also run one training step of this model's architecture (config.json is enough) and list the "
                   "ops that would run on the CPU.")
@_shared_options
@click.pass_context
def doctor(ctx, as_json, model, **given):
    """The machine, library versions, device capabilities and the precision the shim would choose, with reasons.
    With --report FILE, the same findings are also written to FILE as JSON."""
    from mps_shim.doctor import diagnose, render
    from mps_shim.report import write_json

    options = load_options(flags=True, **_given(ctx, given))
    findings = diagnose(options, model)
    if options.report is not None:
        try:
            write_json(options.report, findings)
        except OSError as error:
            source = source_of(options, "report")
            raise ShimConfigError(f"{source}={options.report!r} cannot be written: {error.strerror}") from None
    click.echo(json.dumps(findings, indent=2) if as_json else render(findings))


def _launch(given: dict, program: str, args: list[str], plan_only: bool = False):
    """What to do once click is done: launching happens outside click so Ctrl-C and exit codes are the program's."""

    def launch():
        import mps_shim

        options = load_options(flags=True, **given)
        python_script = is_python_script(program)
        if not python_script:
            find_program(program)  # a missing or unrunnable program stops here, before any work (exec_program
            # finds it again once this environment's bin is first on PATH, as the program will be run)
        # Under MPS_SHIM=1 the start-up hook may have activated this process from the environment: the command's
        # options replace that, and what the hook set in the environment must not reach the program as the user's.
        mps_shim.deactivate()
        if not kill_switch():
            _check_precision_before_launch(options)
            if plan_only:
                os.environ[PLAN_ONLY] = "1"
            prepare_environment(options)
        if python_script:
            mps_shim.activate(**{name: getattr(options, name) for name in ENV})
            if not plan_only and mps_shim.runtime.current() is not None:
                _hold_awake(options, mps_shim.runtime.current().report)
            run_script(program, args)
        else:
            if not plan_only and not kill_switch():
                _hold_awake(options)
            exec_program(program, args)

    return launch


def _hold_awake(options, report=None) -> None:
    """On a Mac: battery and Low Power Mode said now, and no sleep until the program ends (shim/power.py). The
    program keeps this process's id (it runs in it, or replaces it with exec)."""
    from mps_shim.power import prepare_long_run

    if report is None:
        from mps_shim.report import Report

        from mps_shim.log import set_level

        set_level(options.log_level)
        report = Report(options.report)  # its run id is inherited: the program's reports merge with it
    prepare_long_run(report, simulated=options.simulate is not None)


def _check_precision_before_launch(options) -> None:
    """A forced precision this Mac cannot run is refused here, before the program starts any work, naming the
    variable or the flag it came from."""
    if options.precision == "auto":
        return
    from mps_shim.device import detect
    from mps_shim.plan import check_forced_precision

    # detect imports torch only off simulation
    check_forced_precision(detect(options), options.precision, source_of(options, "precision"))


def _stop(error: BaseException) -> None:
    """The one line of a shim exception, and its exit status (shim/errors.py)."""
    if str(error):
        click.echo(f"mps-shim: {error}", err=True)
    sys.exit(error.exit_status)


def main(argv: list[str] | None = None) -> None:
    try:
        action = cli.main(args=argv, prog_name="mps-shim", standalone_mode=False)
        if callable(action):
            action()
        elif isinstance(action, int):
            sys.exit(action)
    except (ShimError, PlanReached) as error:
        _stop(error)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
