"""``python -m hodlr``: the same as the ``hodlr`` command."""

import sys

from hodlr.cli import main

sys.exit(main())
