"""``python -m confspec_lightning`` = the ``confspec`` command."""

from confspec_lightning.cli import main

if __name__ == "__main__":
    main()
