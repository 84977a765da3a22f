"""Fast-path kernels, one module per backend.

Each module exposes ``supports``, ``forward`` and ``backward`` with the
signatures of :mod:`anybn._fastpaths`' dispatch. Modules are imported lazily by
the dispatcher, only for the arrays they serve: :mod:`anybn._kernels.cuda`
(numba-cuda kernels for CuPy arrays and PyTorch CUDA tensors) imports numba.
"""
