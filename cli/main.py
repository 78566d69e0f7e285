"""The `merging` click group: global options, error handling, and the verbs."""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass

import click

import merging
from merging import MergingError, __version__

from .common import console, err_console


@dataclass
class Settings:
    """Options shared by every command."""

    debug: bool = False


PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)`")
FLAGS = {"out_type": "--outtype", "fmt": "--format", "base_weights": "--base", "evals": "--eval"}


def flagged(message: str) -> str:
    """A library message with the parameters it names (`allow_nonfinite`) as flags (--allow-nonfinite)."""
    return PARAMETER.sub(lambda m: FLAGS.get(m[1], "--" + m[1].replace("_", "-")), message)


class MergingGroup(click.Group):
    """A group that turns a MergingError into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MergingError as e:
            if isinstance(ctx.obj, Settings) and ctx.obj.debug:
                raise
            click.echo(f"error: {flagged(str(e))}", err=True)
            ctx.exit(2)


@click.group(cls=MergingGroup)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("--no-color", is_flag=True, help="No colours (as the NO_COLOR environment variable).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch's CPU threads (default: the CPUs this process may use).")  # fmt: skip
@click.version_option(__version__, prog_name="merging")
@click.pass_context
def cli(ctx: click.Context, debug: bool, no_color: bool, threads: int | None) -> None:
    """Adapter arithmetic and merging workbench for LoRA, LoHa, LoKr and IA³.

    Shell completion: eval "$(_MERGING_COMPLETE=bash_source merging)" (zsh_source, fish_source).
    """
    ctx.obj = Settings(debug=debug)
    for c in (console, err_console):  # rich reads NO_COLOR when a console is made; --no-color says it later
        c.no_color = no_color or os.environ.get("NO_COLOR", "") != ""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(message)s")
    if not debug:  # bitsandbytes (PEFT imports it) warns on AVX-512 BF16 CPUs of an optional missing kernel
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not debug:  # torch's, transformers' and PEFT's warnings are for developers; ours are one line each
        warnings.simplefilter("ignore")
    _quiet_transformers()
    if threads is not None:  # the console script has set the environment (cli/entry.py); this is for callers
        import torch

        torch.set_num_threads(threads)
    logging.getLogger("merging").debug("threads: %s", merging.describe_threads(os.environ))


def _quiet_transformers() -> None:
    """transformers prints tqdm bars and warnings of its own; the CLI shows its own progress."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _register() -> None:
    from . import bake, compare, convert, example_base, inspect, merge, publish, tune, verify

    cli.add_command(inspect.inspect_cmd)
    cli.add_command(example_base.example_base_cmd)
    cli.add_command(merge.merge_cmd)
    cli.add_command(verify.verify_cmd)
    cli.add_command(bake.bake_cmd)
    cli.add_command(compare.compare_cmd)
    cli.add_command(convert.convert_cmd)
    cli.add_command(publish.publish_cmd)
    cli.add_command(tune.tune_cmd)


_register()


def main() -> None:
    """Run the commands (the console script is cli/entry.py, which settles threads first)."""
    cli(prog_name="merging")


if __name__ == "__main__":
    main()
