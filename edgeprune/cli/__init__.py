"""The command line: argparse over the jobs, one-line errors and exit codes."""

from edgeprune.cli.commands import main

__all__ = ["main"]
