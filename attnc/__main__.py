"""`python -m attnc`: the command line (attnc/cli.py)."""

from __future__ import annotations

import sys

from attnc.cli import main

if __name__ == "__main__":
    sys.exit(main())
