"""The parts of the ``sae-diff`` command line: parser, subcommand handlers, checks before loading.

The entry point is :func:`sae_diff.cli.main`; this package keeps each part in its own module
so the entry point stays a short dispatch with the error/exit path.
"""
