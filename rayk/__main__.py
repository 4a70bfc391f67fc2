"""``python -m rayk`` is the ``rayk`` command."""

import sys

from rayk.cli import main

sys.exit(main())
