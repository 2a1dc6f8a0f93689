"""``python -m dreamid_core``: see :mod:`dreamid_core.cli`."""

import sys

from .cli import main

sys.exit(main())
