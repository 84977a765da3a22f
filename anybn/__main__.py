"""``python -m anybn``: the backend report.

``python -m anybn gpu-check --out DIR``: the one-command GPU check (anybn._testing.gpucheck).
"""

import sys

if sys.argv[1:2] == ["gpu-check"]:
    from ._testing.gpucheck import main as gpu_check

    sys.exit(gpu_check(sys.argv[2:]))

from ._testing.report import main

sys.exit(main())
