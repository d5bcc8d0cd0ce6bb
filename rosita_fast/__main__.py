"""``python -m rosita_fast``: the ``rosita`` command (see :mod:`rosita_fast.cli`)."""

import sys

from .cli import main

sys.exit(main())
