"""``python -m captum_vit``: the ``captum-vit`` command (see :mod:`captum_vit.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
