"""The ``medseg`` command group: global options and error handling.

Commands import the library (and TensorFlow, where they need it) inside their functions,
so ``medseg --help`` and ``medseg --version`` stay fast.
"""

from __future__ import annotations

import logging

import click

from medseg import __version__
from medseg_cli.data import data
from medseg_cli.demo import demo
from medseg_cli.evaluate import evaluate
from medseg_cli.explain import explain
from medseg_cli.export import export
from medseg_cli.finetune import finetune
from medseg_cli.info import info
from medseg_cli.models import models
from medseg_cli.predict import predict
from medseg_cli.train import train

#: the exit status of a command stopped by Ctrl-C
INTERRUPTED = 130


class InputError(click.ClickException):
    """Bad input named in one line; exit status 2 (usage or input error)."""

    exit_code = 2


class MedsegGroup(click.Group):
    """Turns errors a user can cause into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        from medseg.errors import InputFileError

        try:
            return super().invoke(ctx)
        except InputFileError as exc:
            if ctx.meta.get("medseg.debug"):
                raise
            raise InputError(str(exc)) from None
        except KeyboardInterrupt:
            # Ctrl-C before a command takes it over (while TensorFlow loads, say):
            # 128 + SIGINT, as a shell reports it, not click's "Aborted!" and 1
            click.echo("\ninterrupted", err=True)
            ctx.exit(INTERRUPTED)


@click.group(
    name="medseg",
    cls=MedsegGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="medseg")
@click.option(
    "--debug", is_flag=True, help="Show full tracebacks instead of one-line errors."
)
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """medseg: segment medical scans with Keras.

    Exit status: 0 success, 1 some cases failed (the rest were done), 2 usage or input
    error.
    """
    ctx.meta["medseg.debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


main.add_command(data)
main.add_command(demo)
main.add_command(evaluate)
main.add_command(explain)
main.add_command(export)
main.add_command(finetune)
main.add_command(info)
main.add_command(models)
main.add_command(predict)
main.add_command(train)
