"""``python -m tonumpy``: the same as the ``tonumpy`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
