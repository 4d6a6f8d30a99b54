"""``sae-diff``: the command line of sae_diff (thin: parse, then call the library).

Subcommands: ``harvest``, ``train``, ``upload``, ``organism``, ``demo``, ``stagewise``,
``causal-filter``. Run ``sae-diff <command> --help`` for each; ``docs/training.md`` has the
full story. This module is the entry point (``[project.scripts] sae-diff =
"sae_diff.cli:main"``, and ``python -m sae_diff.cli`` / ``torchrun -m sae_diff.cli``): it
dispatches and owns the error/exit path. The parser is :mod:`sae_diff.commands.parser`, the
handlers :mod:`sae_diff.commands.handlers`, the checks before loading
:mod:`sae_diff.commands.preflight`.

Imports are lazy on purpose: the handlers import ``sae_diff.training`` (the whole trainer),
``sae_diff.hub`` or the delegated module only when their subcommand runs, so ``sae-diff
--help`` and a mistyped flag answer without loading them.

Errors: every deliberate library error is a :class:`sae_diff.errors.SaeDiffError`; the CLI
prints it as one line (what, why, the fix) on stderr and exits with status 2
(``--traceback`` prints the traceback too). Ctrl-C exits with status 130 and one line saying
how to resume. Bad input is checked before any model is loaded where possible (datasets,
the cache's identity, a resumed run's config); see ``docs/reliability.md``.
"""

from __future__ import annotations

import sys
import traceback as tb
from collections.abc import Sequence

from sae_diff.commands.handlers import (
    ANALYSIS_METHODS,
    cmd_harvest,
    cmd_train,
    cmd_upload,
    delegate,
)
from sae_diff.commands.parser import build_parser
from sae_diff.errors import SaeDiffError, one_line
from sae_diff.moved import moved_names, to

#: subcommands owned by another module: ``main`` hands them their argv untouched
DELEGATED: dict[str, tuple[str, str]] = {
    "organism": ("sae_diff.organisms.build", "organism builder"),
    "demo": ("sae_diff.report.demo", "demo pipeline"),
    **{name.replace("_", "-"): target for name, target in ANALYSIS_METHODS.items()},
}


def _report(command: str, err: BaseException, traceback: bool) -> int:
    """Print a library error as one line (and the traceback when asked); exit status 2."""
    if traceback:
        tb.print_exception(err)
    print(f"sae-diff {command}: error: {one_line(err)}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sae-diff`` console script.

    Exit status: 0 success, 2 a library error (printed as one line), 130 interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_tb = "--traceback" in argv
    argv = [a for a in argv if a != "--traceback"]
    command = argv[0] if argv else ""
    try:
        if command in DELEGATED:
            module, what = DELEGATED[command]
            return delegate(module, argv[1:], what)
        parser = build_parser()
        args, rest = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        handlers = {"train": cmd_train, "harvest": cmd_harvest, "upload": cmd_upload}
        return handlers[args.command](args, rest)
    except (SaeDiffError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        return _report(command, e, show_tb)
    except KeyboardInterrupt:
        print(f"sae-diff {command}: interrupted.", file=sys.stderr)
        return 130


# names that moved to sae_diff.commands (import them from there)
__getattr__ = moved_names(
    __name__,
    {
        **to("sae_diff.commands.parser", ["DESCRIPTION", "EPILOG", "TRAIN_EPILOG"]),
        **to("sae_diff.commands.handlers", ["analysis_method", "parse_config"]),
        **to("sae_diff.commands.preflight", ["preflight_cache", "preflight_datasets"]),
    },
)

__all__ = ["ANALYSIS_METHODS", "cmd_harvest", "cmd_train", "cmd_upload", "main"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
