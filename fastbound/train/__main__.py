"""Entry point of ``python -m fastbound.train`` (and ``torchrun ... -m fastbound.train``)."""

import sys

from .loop import main

if __name__ == "__main__":
    sys.exit(main())
