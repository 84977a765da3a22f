"""Repository-level pytest configuration.

The doctests of ``anybn/torch.py`` need PyTorch; without it the module is not
collected, so the README's test command also works where torch is not installed.
"""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("torch") is None:
    collect_ignore.append("anybn/torch.py")
