"""The backend test matrix.

``backend`` is parametrized over :data:`anybn._backends.BACKENDS` (``numpy``,
``array_api_strict``, ``array_api_strict:device1``, ``torch``, ``torch:cuda``,
``cupy``); a backend whose library or device is missing is skipped with the
reason. Tests take ``backend`` and move NumPy data onto it with
``backend.asarray`` and back with ``backend.to_numpy``.
"""

from __future__ import annotations

import numpy as np
import pytest

from anybn._backends import BACKENDS, Backend


@pytest.fixture(params=BACKENDS, ids=[b.id for b in BACKENDS])
def backend(request: pytest.FixtureRequest) -> Backend:
    """One backend of the matrix, skipped with a reason when unavailable."""
    b: Backend = request.param
    reason = b.unavailable_reason()
    if reason is not None:
        pytest.skip(f"{b.id}: {reason}")
    return b


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator: every test is deterministic."""
    return np.random.default_rng(20261125)
