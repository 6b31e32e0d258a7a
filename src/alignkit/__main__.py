"""``python -m alignkit``: the command line, also what ``torchrun ... -m alignkit train`` starts."""

import sys

from alignkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
