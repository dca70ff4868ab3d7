"""``confspec`` and ``python -m confspec_lightning``: answers ``--version`` at once, else runs the CLI."""

from __future__ import annotations

import sys


def main(args: list[str] | None = None) -> None:
    """Entry point: ``--version`` without importing torch or Lightning, everything else through the CLI."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv in (["--version"], ["-V"]):
        from confspec_lightning import __version__

        print(f"confspec {__version__}")
        return
    from confspec_lightning.cli import main as cli_main

    cli_main(args)


if __name__ == "__main__":
    main()
