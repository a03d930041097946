"""The `vpmoe` command."""

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vpmoe` console script."""
    print("vpmoe: no commands yet", file=sys.stderr)
    return 2
