"""``python -m anybn``: the backend report.

``python -m anybn gpu-check --out DIR``: the one-command GPU check (anybn._gpucheck).
"""

import sys

if sys.argv[1:2] == ["gpu-check"]:
    from ._gpucheck import main as gpu_check

    sys.exit(gpu_check(sys.argv[2:]))

from ._report import main

sys.exit(main())
