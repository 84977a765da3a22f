"""The array type of anybn's public signatures, for static type checkers.

anybn takes the arrays of several libraries (NumPy, CuPy, PyTorch, array-api-strict, ...)
that share no base class, so its public functions are annotated with a structural type: a
:class:`typing.Protocol` that every such array satisfies (it has a ``shape``, an ``ndim`` and
a ``dtype``) and that lists, tuples and Python scalars do not. mypy and pyright then check
call sites (``anybn.batch_norm([1.0, 2.0])`` is an error) without anybn importing any array
library. Inside anybn, ``anybn._xp.Array`` stays an alias of ``Any``.

The protocol is deliberately small: the array API standard's full ``Array`` protocol is not
something PyTorch's tensors satisfy statically, and a call-site check needs only to tell an
array from a non-array.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

__all__ = ["AnyArray", "ArrayT"]


class AnyArray(Protocol):
    """Any array anybn accepts: the type of its public functions' array arguments.

    A :class:`typing.Protocol` (structural: nothing to inherit or register) satisfied by
    NumPy and CuPy arrays, PyTorch tensors and array-API arrays, and not by lists, tuples or
    Python numbers. Use it to annotate your own code that passes arrays to anybn.

    Attributes
    ----------
    shape : tuple of int
        The array's shape.
    ndim : int
        The number of dimensions.
    dtype : object
        The array's data type (its library's dtype object).

    Examples
    --------
    >>> import numpy as np
    >>> import anybn
    >>> def normalize(x: anybn.AnyArray) -> anybn.AnyArray:
    ...     return anybn.batch_norm(x, training=True).y
    >>> normalize(np.array([[1.0, 2.0], [3.0, 6.0]])).tolist()
    [[-0.99999..., -0.99999...], [0.99999..., 0.99999...]]
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def ndim(self) -> int: ...

    @property
    def dtype(self) -> Any: ...

    # The arithmetic anybn's statistics (chan_merge) do on their arguments.
    def __add__(self, other: Any, /) -> Any: ...
    def __radd__(self, other: Any, /) -> Any: ...
    def __sub__(self, other: Any, /) -> Any: ...
    def __rsub__(self, other: Any, /) -> Any: ...
    def __mul__(self, other: Any, /) -> Any: ...
    def __rmul__(self, other: Any, /) -> Any: ...
    def __truediv__(self, other: Any, /) -> Any: ...
    def __rtruediv__(self, other: Any, /) -> Any: ...


#: A type variable bound to :class:`AnyArray`: a function annotated ``(x: ArrayT) -> ArrayT``
#: returns an array of its argument's type (a NumPy array for a NumPy array, ...).
ArrayT = TypeVar("ArrayT", bound=AnyArray)
