"""Entry point of ``python -m fastbound.train`` (and ``torchrun ... -m fastbound.train``)."""

import sys

from .loop import main

if __name__ == "__main__":
    if sys.argv[1:2] == ["continuous"]:  # the continuous-data reference run (fastbound/train/continuous.py)
        from .continuous import main as continuous_main
        sys.exit(continuous_main(sys.argv[2:]))
    sys.exit(main())
