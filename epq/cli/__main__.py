"""``python -m epq.cli``: the ``epq`` command."""

import sys

from . import main

sys.exit(main())
