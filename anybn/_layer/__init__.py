"""The stateful layer :class:`anybn.BatchNorm`, in four modules.

* :mod:`~anybn._layer.batchnorm`: the class (mode, forward and backward, the kept call,
  the commit of a successful call);
* :mod:`~anybn._layer.rules`: PyTorch's module rule (which statistics, the running
  update's factor), shared with the ``anybn.torch`` modules;
* :mod:`~anybn._layer.placement`: where the arrays live (library, device, dtype);
* :mod:`~anybn._layer.state`: state dicts, copies and pickles.
"""

from .batchnorm import BatchNorm
from .state import IncompatibleKeys

__all__ = ["BatchNorm", "IncompatibleKeys"]
