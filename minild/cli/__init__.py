"""The ``minild`` command line: train, train-vae, distill, sample, plugins, experiment, lab. Only this wing
prints and exits: ``parser`` builds the arguments, ``train`` and ``sample`` run the subcommands."""

from __future__ import annotations

import sys

from minild.cli.arguments import INTERRUPTED_EXIT_CODE, parse_guidance
from minild.cli.parser import build_parser as _parser
from minild.errors import UnavailableError

__all__ = ["main", "parse_guidance"]

# What a user can fix (a config, a path, a missing package, a full disk): printed as one line.
# Anything else is a bug in minild or a plugin and keeps its traceback.
USER_ERRORS = (ValueError, OSError, UnavailableError)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:  # a second Ctrl-C: the files written so far are complete ones
        if args.debug:
            raise
        print("minild: aborted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"minild: error: {_one_line(err)} (run `minild --debug ...` for the traceback)", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
