"""The backend test matrix.

``backend`` is parametrized over :data:`anybn._testing.backends.BACKENDS` (``numpy``,
``array_api_strict``, ``array_api_strict:device1``, ``torch``, ``torch:cuda``,
``cupy``, ``jax``, ``jax:jit``, ``dask``); a backend whose library or device is
missing is skipped with the reason. Tests take ``backend`` and move NumPy data onto it with
``backend.asarray`` and back with ``backend.to_numpy``.

A test that also takes ``dtype`` runs over every (backend, dtype) pair the
backend supports (``backend.dtypes``: float32, float64 and its half types),
with ids like ``torch-bfloat16``; one that takes ``half_dtype`` over the half
types only (``backend.half_dtypes``). The pairs are fixed at collection, so a
missing backend skips its rows instead of removing them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from _helpers import CURRENT, require

from anybn._testing.backends import BACKENDS, Backend


def _params(dtypes: str | None) -> list[object]:
    """``pytest.param(backend)``, or ``(backend, dtype)`` over ``backend.<dtypes>``."""
    if dtypes is None:
        return [pytest.param(b, id=b.id) for b in BACKENDS]
    return [pytest.param(b, d, id=f"{b.id}-{d}") for b in BACKENDS for d in getattr(b, dtypes)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``backend``, jointly with ``dtype`` or ``half_dtype`` where a test takes one.

    ``dtype`` runs over every dtype of each backend, ``half_dtype`` over its half types only.
    A test that parametrizes ``backend`` or the dtype itself keeps its own values.
    """
    direct = {
        name.strip()
        for mark in metafunc.definition.iter_markers("parametrize")
        for name in (mark.args[0].split(",") if isinstance(mark.args[0], str) else mark.args[0])
    }
    if "backend" not in metafunc.fixturenames or "backend" in direct:
        return
    for name, dtypes in (("dtype", "dtypes"), ("half_dtype", "half_dtypes")):
        if name in metafunc.fixturenames and name not in direct:
            metafunc.parametrize(("backend", name), _params(dtypes), indirect=["backend"])
            return
    metafunc.parametrize("backend", _params(None), indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """One backend of the matrix, skipped with a reason when unavailable.

    While the test runs, the helpers' calls of anybn go through ``backend.call``
    (``jax:jit`` runs them under ``jax.jit``).
    """
    b = require(request.param.id)
    CURRENT.append(b)
    try:
        yield b
    finally:
        CURRENT.pop()


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator: every test is deterministic."""
    return np.random.default_rng(20261125)


#: Backends whose every call costs a trace or a graph (JAX compiles per shape, Dask
#: builds a graph): on them the big layout x mode x options matrices run a thinned
#: subset (float32/float64, with both or neither of weight/bias and running stats),
#: which still covers every layout and both modes; tests/test_jax.py and
#: tests/test_dask.py test them in depth.
THINNED = {"jax", "jax:jit", "dask"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the thinned rows (see :data:`THINNED`); pytest reports them as deselected."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        backend, case = params.get("backend"), params.get("case")
        thinned = (
            isinstance(backend, Backend)
            and backend.id in THINNED
            and case is not None
            and (
                getattr(case, "affine", True) != getattr(case, "stats", True)
                or params.get("dtype") == "float16"
            )
        )
        (drop if thinned else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    config.anybn_thinned = len(drop)  # type: ignore[attr-defined]  # (the summary says why)
