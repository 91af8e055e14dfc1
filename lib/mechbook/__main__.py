"""``python -m mechbook``: the command line in :mod:`mechbook.book.cli`."""

import sys

from mechbook.book.cli import main

sys.exit(main())
