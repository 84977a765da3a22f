"""``python -m anybn``: the backend report."""

import sys

from ._report import main

sys.exit(main())
