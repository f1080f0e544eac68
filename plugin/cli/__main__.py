"""``python -m plugin.cli``: the same as the ``radgate`` console script."""

import sys

from plugin.cli.main import main

sys.exit(main())
