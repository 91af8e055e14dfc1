"""``python -m mechbook``: the command line in :mod:`mechbook.cli`."""

import sys

from mechbook.cli import main

sys.exit(main())
