"""Tools for testing and reporting on anybn's backends; not imported by ``import anybn``.

* :mod:`anybn._testing.backends`: the registry of backends anybn exercises (NumPy,
  array-api-strict and its second device, torch, torch CUDA, CuPy, JAX, Dask, ...):
  whether each can run here and why not, and how to move arrays onto it and back.
  The test matrix and ``python -m anybn`` both iterate over it.
* :mod:`anybn._testing.reference`: the float64 NumPy reference of the forward and
  backward that every backend is compared with.
* :mod:`anybn._testing.report`: ``python -m anybn``, the backend report.
* :mod:`anybn._testing.gpucheck`: ``python -m anybn gpu-check``, the one-command check
  of a CUDA machine.
"""
