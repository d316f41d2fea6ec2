"""``python -m moller_scg``: the ``moller-scg`` command."""

import sys

from moller_scg.cli import main

sys.exit(main())
