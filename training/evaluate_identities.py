"""``python -m training.evaluate_identities``: several identity methods, one table (:mod:`training.evaluate.compare`)."""

import sys

from training.evaluate.compare import main

if __name__ == "__main__":
    sys.exit(main())
