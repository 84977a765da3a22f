"""Call sites that mypy must reject, each on a line tagged ``# E: <mypy error code>``.

``python .ci/check_typing.py`` checks that mypy reports exactly these lines (no more, no
fewer), so a public signature that loses its array type (back to ``Any``) fails CI.
``anybn.batch_norm`` is overloaded (its result type follows ``renorm``): a wrong argument
is mypy's ``call-overload`` there (no overload matches).
"""

from __future__ import annotations

import numpy as np

import anybn


def wrong_calls() -> None:
    x = np.zeros((4, 3), np.float32)
    anybn.batch_norm([[1.0, 2.0], [3.0, 4.0]])  # E: call-overload
    anybn.batch_norm(1.5, training=True)  # E: call-overload
    anybn.batch_norm(x, "running_mean")  # E: call-overload
    anybn.batch_norm(x, training="yes")  # E: call-overload
    anybn.batch_norm_backward((1.0, 2.0), x, None, x, x)  # E: arg-type
    anybn.BatchNorm(3)([1.0, 2.0, 3.0])  # E: type-var
    anybn.BatchNorm(3).backward([0.0])  # E: arg-type
    anybn.chan_merge(3, [1.0], [1.0], 2, x, x)  # E: arg-type
    y = anybn.BatchNorm(3)(x)
    _ = y.no_such_attribute  # E: attr-defined
