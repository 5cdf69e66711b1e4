"""The ``conveyor`` command."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="conveyor")
def cli() -> None:
    """conveyor: producer-consumer pipelines over bounded channels."""


@cli.command()
def demo() -> None:
    """Show conveyor at work on the classic producer-consumer scenario."""
    from .demo import run_demo

    raise SystemExit(run_demo())


def main() -> None:
    """Entry point of the ``conveyor`` console script."""
    cli()
