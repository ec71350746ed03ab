"""``python -m evaluation``: see ``evaluation/cli.py`` (or ``python -m evaluation --help``)."""

import sys

from evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
