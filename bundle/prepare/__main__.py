"""``python -m bundle.prepare ...``: see :mod:`bundle.prepare.cli`."""

import sys

from bundle.prepare.cli import main

sys.exit(main())
