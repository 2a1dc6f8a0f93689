"""``python -m dreamid_core``: see :mod:`dreamid_core.cli.main`."""

import sys

from .cli.main import main

sys.exit(main())
