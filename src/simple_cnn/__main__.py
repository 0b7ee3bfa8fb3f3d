"""``python -m simple_cnn``: the same entry point as the ``simple-cnn`` command."""

import sys

from .cli import main

sys.exit(main())
