"""The stateful layer: :class:`BatchNorm`, for arrays of any array-API library.

The layer owns what the functional core does not: the parameters (``weight``,
``bias``), the buffers (``running_mean``, ``running_var``, ``num_batches_tracked``),
the train/eval mode, what ``backward`` needs from the last forward, and the
state dict. Every computation is a call to :func:`anybn.batch_norm` or
:func:`anybn.batch_norm_backward`; the rules for which statistics to use and
how to update them are PyTorch's ``nn.BatchNorm*d`` rules.
"""

from __future__ import annotations

import copy
import importlib
import numbers
import operator
import threading
from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple

import array_api_compat as compat
import numpy as np

from . import _kernels as kernels
from ._api import BatchNormGrads, batch_norm, batch_norm_backward
from ._call import resolve_forward
from ._checks import (
    check_bool,
    check_eps,
    check_input,
    check_momentum,
    check_training,
    check_var_estimator,
)
from ._typing import AnyArray, ArrayT
from ._xp import (
    Array,
    check_namespace,
    compute_dtype,
    dtype_name,
    is_concrete,
    normalize_axes,
    param_shape,
    stop_gradient,
    to_host,
)
from .distributed.sync import reports_failures

__all__ = ["BatchNorm", "IncompatibleKeys"]

_COUNTER = "num_batches_tracked"

#: ``num_batches_tracked`` is stored as int64, as torch stores it.
_COUNTER_MAX = 2**63 - 1

#: Input types whose calls the layer keeps resolved between calls (see _forward_resolved):
#: NumPy arrays, and torch tensors once one has come.
_RESOLVED_TYPES: set[type] = {np.ndarray}


class IncompatibleKeys(NamedTuple):
    """What :meth:`BatchNorm.load_state_dict` returns, as torch's ``load_state_dict`` does."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class _Arrays(NamedTuple):
    """The per-channel arrays of a layer; ``None`` where the layer has none."""

    weight: Array | None
    bias: Array | None
    running_mean: Array | None
    running_var: Array | None


class _Storage(NamedTuple):
    """Where a layer's arrays live: namespace, device and floating dtype."""

    xp: ModuleType
    device: Any
    dtype: Any


class _Saved(NamedTuple):
    """What :meth:`BatchNorm.backward` needs from the last forward."""

    xp: ModuleType
    x: Array
    weight: Array | None
    mean: Array
    invstd: Array
    training: bool
    axis: int | tuple[int, ...]
    comm: Any = None
    mask: Array | None = None


def _kinds(arrays: _Arrays) -> tuple[Any, ...]:
    """Each array's type, shape, dtype and device (None stays None)."""
    return tuple(
        None if a is None else (type(a), a.shape, a.dtype, getattr(a, "device", None))
        for a in arrays
    )


class _Kept(NamedTuple):
    """A resolved call kept for the next forward with the same kind of x.

    It serves a call whose x has this type, shape, dtype and device, on a layer
    whose storage and options are these very objects (identity: a reassigned
    option, even to an equal value, is checked again) and whose arrays are these
    objects or of the same kinds.
    """

    x_type: type[Any]
    shape: tuple[int, ...]
    dtype: Any
    device: Any
    storage: _Storage
    options: tuple[Any, ...]
    arrays: _Arrays
    kinds: tuple[Any, ...]
    call: Any
    update: bool


class _JaxDevice(NamedTuple):
    """A JAX device in a form that copies and pickles (JAX's ``Device`` objects do not)."""

    platform: str
    id: int


def _portable_device(device: Any) -> Any:
    """``device`` in a form ``copy.deepcopy`` and ``pickle`` accept (see :func:`_live_device`)."""
    module = type(device).__module__.split(".")[0]
    if module in ("jax", "jaxlib") and hasattr(device, "platform") and hasattr(device, "id"):
        return _JaxDevice(device.platform, device.id)
    return device


def _live_device(device: Any) -> Any:
    """The device :func:`_portable_device` stood for; None (the default) where it is gone.

    A JAX device that this process lacks (a pickle from a machine with more
    GPUs) becomes None: the arrays then live on JAX's default device, which is
    where JAX itself unpickles arrays.
    """
    if not isinstance(device, _JaxDevice):
        return device
    import jax

    try:
        candidates = jax.devices(device.platform)
    except RuntimeError:  # no backend for that platform here
        return None
    return next((d for d in candidates if d.id == device.id), None)


def _materialised(*arrays: Array) -> tuple[Array, ...]:
    """Dask arrays computed (one pass over their shared graph) and wrapped back, chunk for chunk.

    What the layer stores must not hold the graph that made it: a running
    statistic is a function of the previous one and the batch, so a lazy one
    would chain every batch seen, and keep every batch alive.
    """
    import dask
    import dask.array as da

    values = dask.compute(*arrays)
    return tuple(da.from_array(v, chunks=a.chunks) for v, a in zip(values, arrays, strict=True))


def _check_storable(arrays: _Arrays) -> None:
    """Raise if an array the layer would keep is a JAX tracer (a call inside a transform)."""
    traced = [
        name
        for name, a in arrays._asdict().items()
        if a is not None and compat.is_jax_array(a) and not is_concrete(a)
    ]
    if traced:
        raise RuntimeError(
            "BatchNorm cannot keep arrays computed inside a JAX transformation (jax.jit, "
            f"jax.grad, jax.vmap, ...): {', '.join(traced)} would be tracers. Call the layer "
            "outside the transformation (or in eval mode once its arrays exist), or keep the "
            "running statistics as explicit state with anybn.batch_norm"
        )


def _describe(a: object) -> str:
    t = type(a)
    return f"{t.__module__.split('.')[0]}.{t.__qualname__}"


def _check_num_features(num_features: object) -> int | tuple[int, ...] | None:
    if num_features is None:
        return None
    if isinstance(num_features, (tuple, list)):  # the shape of several channel axes
        if not num_features:
            raise ValueError("num_features must be a positive int, a tuple of them, or None")
        return tuple(_check_num_features(n) for n in num_features)  # type: ignore[misc]
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        raise TypeError(
            f"num_features must be a positive int or None, got {type(num_features).__name__}"
        )
    if num_features < 1:
        raise ValueError(f"num_features must be a positive int or None, got {num_features}")
    return int(num_features)


def _check_axis(axis: object) -> int | tuple[int, ...]:
    if isinstance(axis, (tuple, list)):
        if not axis:
            raise ValueError("axis must name at least one channel axis, got an empty sequence")
        return tuple(_check_axis(a) for a in axis)  # type: ignore[misc]
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    return int(axis)


def _namespace_of(xp: ModuleType) -> ModuleType:
    """The array-api-compat namespace for a library module (``numpy`` -> its wrapper)."""
    return compat.array_namespace(xp.asarray(0.0))


_FLOATING = ("float16", "bfloat16", "float32", "float64")


def _check_dtype(dtype: object) -> object:
    """None, or a floating dtype given by name or as a dtype of any library."""
    if (
        dtype is not None
        and (dtype if isinstance(dtype, str) else dtype_name(dtype)) not in _FLOATING
    ):
        raise TypeError(f"dtype must be one of {', '.join(_FLOATING)} (or None), got {dtype!r}")
    return dtype


def _resolve_dtype(xp: ModuleType, dtype: object) -> object:
    """``dtype`` (a name, or a dtype of any library) as a dtype of ``xp``."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    resolved = getattr(xp, name, None)
    if resolved is None or not xp.isdtype(resolved, "real floating"):
        raise TypeError(f"dtype must be a real floating dtype of {xp.__name__}, got {dtype!r}")
    return resolved


def _convert(a: Array, storage: _Storage) -> Array:
    """A copy of ``a`` (any library) in the namespace, device and dtype of ``storage``."""
    xp, device, dtype = storage
    if compat.is_torch_array(a):
        a = a.detach()
    if compat.array_namespace(a) is xp:
        if device is not None:
            a = compat.to_device(a, device)
        return xp.astype(a, dtype, copy=True)
    return xp.asarray(to_host(a), dtype=dtype, device=device, copy=True)


def _source_vector(value: Any, key: str, several_axes: bool = False) -> Array:
    """A state-dict entry for a per-channel array, checked to be a 1-D real array."""
    a = value
    if not compat.is_array_api_obj(a):
        if not isinstance(a, (list, tuple)):
            raise TypeError(f"state_dict[{key!r}] must be an array, got {_describe(value)}")
        try:
            a = np.asarray(a)
        except (ValueError, TypeError) as exc:  # ragged or non-numeric lists
            raise ValueError(
                f"state_dict[{key!r}] must be a flat list of numbers (one per channel): {exc}"
            ) from None
    if compat.is_numpy_array(a) and isinstance(a, np.ma.MaskedArray):
        raise TypeError(
            f"state_dict[{key!r}] is a NumPy masked array, whose mask anybn does not "
            "apply; pass .filled(value) or .data"
        )
    xp = compat.array_namespace(a)
    if not xp.isdtype(a.dtype, ("real floating", "integral")):
        raise TypeError(f"state_dict[{key!r}] must have a real dtype, got {dtype_name(a.dtype)}")
    if a.ndim != 1 and not (several_axes and a.ndim >= 1):
        raise ValueError(
            f"state_dict[{key!r}] must be 1-D (one value per channel), got shape {tuple(a.shape)}"
        )
    return a


def _source_counter(value: Any) -> int:
    """The ``num_batches_tracked`` entry: a Python int or a 0-d integer array, >= 0."""
    if compat.is_array_api_obj(value):
        shape, dtype = tuple(value.shape), value.dtype
        if shape != () or not compat.array_namespace(value).isdtype(dtype, "integral"):
            raise TypeError(
                f"state_dict[{_COUNTER!r}] must be a 0-d integer array or an int, got "
                f"dtype {dtype_name(dtype)} and shape {shape}"
            )
        count = int(value)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        count = int(value)
    else:
        raise TypeError(
            f"state_dict[{_COUNTER!r}] must be a 0-d integer array or an int, "
            f"got {_describe(value)}"
        )
    if not 0 <= count <= _COUNTER_MAX:
        raise ValueError(
            f"state_dict[{_COUNTER!r}] must be >= 0 and < 2**63 (it is stored as int64), "
            f"got {count}"
        )
    return count


class BatchNorm:
    r"""A batch-normalization layer for arrays of any array-API library.

    The stateful counterpart of :func:`anybn.batch_norm`, with the semantics of
    PyTorch's ``nn.BatchNorm1d/2d/3d``: in training it normalizes with the batch
    statistics and updates the running ones; in eval it normalizes with the
    running statistics::

        y            = (x - mean) / sqrt(var + eps) * weight + bias
        running_mean = (1 - factor) * running_mean + factor * mean
        running_var  = (1 - factor) * running_var  + factor * var * n / (n - 1)

    where ``factor`` is ``momentum``, or ``1 / num_batches_tracked`` (a
    cumulative average) when ``momentum`` is None.

    Parameters
    ----------
    num_features : int or None, optional
        The number of channels ``C``. None infers it from the first input (or
        the first loaded state dict), as ``torch.nn.LazyBatchNorm*d`` does.
    axis : int or tuple of int, optional
        The channel axis of the inputs: 1 for ``(N, C, ...)``, -1 for channels-last;
        a tuple for several channel axes (Keras' list ``axis``, Chainer's
        ``param_shape``), whose per-channel arrays then have the shape of those
        axes and ``num_features`` is that shape (a tuple).
    eps : float, optional
        Added to the variance for stability; must be > 0.
    momentum : float or None, optional
        Weight of the batch statistics in the running update, in [0, 1]; None
        for the cumulative average over all batches seen.
    affine : bool, optional
        Whether the layer has a learnable ``weight`` (init 1) and ``bias`` (init 0).
    track_running_stats : bool, optional
        Whether the layer keeps ``running_mean`` (init 0), ``running_var`` (init 1)
        and ``num_batches_tracked`` (init 0). Without them it normalizes with
        batch statistics in eval mode too, and those attributes are None.
    xp : module, optional
        The array library of the parameters and buffers (``numpy``, ``cupy``,
        ``torch``, ``array_api_strict``, ...). When given, the arrays are created
        at once on ``device`` (default: the library's default device) in
        ``dtype`` (default: the library's default floating dtype). When omitted,
        the first input decides the library, and the device and dtype that were
        not given (the dtype is the input's, or float32 for float16/bfloat16
        inputs); until then the arrays are NumPy placeholders.
    device : object, optional
        The device of the parameters and buffers, in the library's own terms.
    dtype : dtype or str, optional
        The floating dtype of the parameters and buffers: a name (``"float32"``)
        or a dtype of any library, looked up by name in the layer's library.
    comm : optional
        Synchronize the batch statistics over processes in training (and the
        gradient through them in :meth:`backward`): a ``torch.distributed``
        ProcessGroup, an mpi4py communicator, ``"torch"``, ``"mpi"`` or an
        :class:`anybn.distributed.Communicator`, as for :func:`anybn.batch_norm`.
        Every rank then holds the same running statistics. None: local.
    var_estimator : {"unbiased", "biased"}, optional
        The variance the running variance accumulates: unbiased (PyTorch,
        Chainer; the default) or biased (Keras, Flax; see
        :mod:`anybn.convert` for their checkpoints).

    Attributes
    ----------
    weight, bias : array or None
        The affine parameters, shape ``(C,)``; None when ``affine=False``.
    running_mean, running_var : array or None
        The running statistics, shape ``(C,)``; None when ``track_running_stats=False``.
    num_batches_tracked : int or None
        The number of training batches seen, a Python int (so that the
        cumulative factor needs no device round trip); ``state_dict()`` gives it
        as a 0-d int64 array, as torch does. None when ``track_running_stats=False``.
    training : bool
        The mode: True (the initial mode) or False; see :meth:`train` and :meth:`eval`.

    Notes
    -----
    The arrays are plain attributes in the layer's library: update them with
    ordinary array code (``bn.weight -= lr * grads.dweight``). A forward never
    modifies an array in place; it replaces the running statistics with new
    arrays. ``backward`` uses the input, weight and statistics of the last
    forward, so change the weight only after calling it.

    A call that raises (a bad input, a bad state dict, ``backward`` before any
    forward) leaves the layer exactly as it was: parameters, running
    statistics, counter, library and the forward saved for ``backward``.

    Threads may share a layer: each forward reads the state, computes and
    commits under the layer's lock, so no update is lost (forwards on one layer
    run one at a time; its array work is multi-threaded inside), and
    ``backward`` pairs with the last forward *of the calling thread*. Copies
    (``copy.deepcopy``, ``pickle``) carry the parameters, buffers, counter and
    mode, not the saved forward, on every library, with the arrays on the
    original's device.

    What the layer holds does not grow with the number of batches and keeps no
    earlier batch alive, on lazy arrays too. On Dask a training forward
    computes the new running statistics (one pass over ``x``, with Dask's
    current scheduler) and stores them as Dask arrays of their computed values,
    instead of a graph that would chain every batch seen; ``y`` stays lazy (and
    computing it passes over ``x`` again). A batch whose graph fails raises in
    the forward and leaves the layer as it was. On JAX the layer runs eagerly:
    a training call inside ``jax.jit`` (or another transformation that makes
    tracers) raises RuntimeError instead of storing tracers; keep the state
    explicit with :func:`anybn.batch_norm` there.

    Examples
    --------
    >>> import numpy as np
    >>> import anybn
    >>> bn = anybn.BatchNorm(2)
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> bn(x)
    array([[-0.99999..., -0.99999...],
           [ 0.99999...,  0.99999...]])
    >>> bn.running_mean, bn.num_batches_tracked
    (array([0.2, 2. ]), 1)
    >>> g = bn.backward(np.array([[1.0, 0.0], [0.0, 0.0]]))
    >>> g.dbias, g.dweight
    (array([1., 0.]), array([-0.99999...,  0.        ]))
    >>> _ = bn.eval()
    >>> bn(x)[:, 0]
    array([0.7627..., 2.6696...])
    >>> sorted(bn.state_dict())
    ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    """

    def __init__(
        self,
        num_features: int | tuple[int, ...] | None = None,
        *,
        axis: int | tuple[int, ...] = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        xp: ModuleType | None = None,
        device: Any = None,
        dtype: Any = None,
        comm: Any = None,
        var_estimator: str = "unbiased",
    ) -> None:
        self.num_features = _check_num_features(num_features)
        self.var_estimator = check_var_estimator(var_estimator)
        self.axis = _check_axis(axis)
        self.eps = check_eps(eps)
        self.momentum = None if momentum is None else check_momentum(momentum)
        self.affine = check_bool(affine, "affine")
        self.track_running_stats = check_bool(track_running_stats, "track_running_stats")
        self.training = True
        self._device = device
        self._dtype = _check_dtype(dtype)
        self._storage: _Storage | None = None
        if xp is not None:
            xp = _namespace_of(check_namespace(xp))
            floating = xp.__array_namespace_info__().default_dtypes(device=device)["real floating"]
            self._storage = _Storage(
                xp, device, floating if dtype is None else _resolve_dtype(xp, dtype)
            )
        self.weight: Array | None = None
        self.bias: Array | None = None
        self.running_mean: Array | None = None
        self.running_var: Array | None = None
        self.num_batches_tracked: int | None = 0 if self.track_running_stats else None
        self._lock = threading.RLock()
        self._local = threading.local()
        self.comm = comm
        if self.num_features is not None:
            self._set_arrays(self._fresh(self.num_features, self._placement()))

    # --- where the arrays live -----------------------------------------------------------

    def _placement(self) -> _Storage:
        """Where the arrays live now: the layer's library, or NumPy placeholders."""
        if self._storage is not None:
            return self._storage
        np_xp = compat.array_namespace(np.empty(0))
        try:
            dtype = _resolve_dtype(np_xp, self._dtype) if self._dtype is not None else np.float64
        except TypeError:  # a dtype NumPy lacks (bfloat16): hold float64 until bound
            dtype = np.float64
        return _Storage(np_xp, None, dtype)

    def _placement_for(self, x: Array) -> _Storage:
        """Where the arrays must live to process ``x``; raises if ``x`` cannot be processed."""
        if not compat.is_array_api_obj(x):
            raise TypeError(f"x must be an array (NumPy, CuPy, PyTorch, ...), got {_describe(x)}")
        xp = compat.array_namespace(x)
        if self._storage is not None and xp is not self._storage.xp:
            raise TypeError(
                f"this BatchNorm holds {self._storage.xp.__name__} arrays, got x of type "
                f"{_describe(x)}; pass inputs of one library (or create the layer with "
                "xp=None to let the first input decide)"
            )
        check_input(xp, x)
        if self._storage is not None:
            return self._storage
        device = compat.device(x) if self._device is None else self._device
        if self._dtype is None:
            return _Storage(xp, device, compute_dtype(xp, x.dtype))
        return _Storage(xp, device, _resolve_dtype(xp, self._dtype))

    def _fresh(self, channels: int | tuple[int, ...], storage: _Storage) -> _Arrays:
        """Initial arrays: weight 1, bias 0, running_mean 0, running_var 1."""
        xp, device, dtype = storage

        shape = (channels,) if isinstance(channels, int) else tuple(channels)

        def full(value: float, present: bool) -> Array | None:
            return xp.full(shape, value, dtype=dtype, device=device) if present else None

        arrays = _Arrays(
            full(1.0, self.affine),
            full(0.0, self.affine),
            full(0.0, self.track_running_stats),
            full(1.0, self.track_running_stats),
        )
        if compat.is_dask_namespace(xp):  # the layer holds values, not graphs (see forward)
            present = [a for a in arrays if a is not None]
            done = iter(_materialised(*present))
            arrays = _Arrays(*(None if a is None else next(done) for a in arrays))
        return arrays

    def _arrays(self) -> _Arrays:
        return _Arrays(self.weight, self.bias, self.running_mean, self.running_var)

    def _set_arrays(self, arrays: _Arrays) -> None:
        self.weight, self.bias, self.running_mean, self.running_var = arrays

    def _arrays_in(self, storage: _Storage, channels: int) -> _Arrays:
        """The current arrays moved to ``storage`` (fresh ones if there are none yet)."""
        if self.num_features is None:
            return self._fresh(channels, storage)
        if storage == self._storage:
            return self._arrays()
        return _Arrays(*(None if a is None else _convert(a, storage) for a in self._arrays()))

    @property
    def _saved(self) -> _Saved | None:
        """What the calling thread's last successful forward left for :meth:`backward`."""
        return getattr(self._local, "saved", None)

    # --- copying and pickling ------------------------------------------------------------

    def _copyable_state(self) -> dict[str, Any]:
        """``__dict__`` less the lock and the saved forward; the library by module name,
        devices in a form that copies (:func:`_portable_device`)."""
        with self._lock:
            state = self.__dict__.copy()
        del state["_lock"], state["_local"]
        state["_device"] = _portable_device(state.get("_device"))
        if self._storage is not None:  # modules do not pickle: the namespace by name
            xp, device, dtype = self._storage
            state["_storage"] = (xp.__name__, _portable_device(device), dtype)
        return state

    def __getstate__(self) -> dict[str, Any]:
        """The layer's state, picklable: the library by module name, no lock, no saved forward.

        A copy (``copy.deepcopy``, ``pickle``) has the parameters, buffers,
        counter and mode of the original; it needs a forward of its own before
        ``backward``. A deep copy shares the original's ``comm`` (a communicator
        belongs to its process); pickling a layer whose ``comm`` is a
        communicator object (not None, ``"torch"`` or ``"mpi"``) raises TypeError.
        """
        state = self._copyable_state()
        comm = state.get("comm")
        if comm is not None and not isinstance(comm, str):
            raise TypeError(
                f"cannot pickle a BatchNorm whose comm is a {type(comm).__name__}: a "
                "communicator belongs to its process; set comm=None (or 'torch'/'mpi') "
                "before pickling and attach the new process's communicator after loading"
            )
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> BatchNorm:
        state = self._copyable_state()
        comm = state.pop("comm", None)
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__({**copy.deepcopy(state, memo), "comm": comm})
        return clone

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["_device"] = _live_device(state.get("_device"))
        if state.get("_storage") is not None:
            name, device, dtype = state["_storage"]
            xp = _namespace_of(importlib.import_module(name))
            live = _live_device(device)
            present = [k for k in _Arrays._fields if state.get(k) is not None]
            if live is None and device is not None and present:  # gone: where JAX put them
                live = compat.device(state[present[0]])
            for key in present:  # JAX unpickles arrays onto its default device
                if live is not None and compat.device(state[key]) != live:
                    state[key] = compat.to_device(state[key], live)
            state["_storage"] = _Storage(xp, live, dtype)
        state.setdefault("var_estimator", "unbiased")  # pickles from before the option
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._local = threading.local()

    # --- mode ----------------------------------------------------------------------------

    def train(self, mode: bool = True) -> BatchNorm:
        """Set training mode (``mode=True``) or eval mode; return the layer."""
        self.training = check_bool(mode, "mode")
        return self

    def eval(self) -> BatchNorm:
        """Set eval mode; return the layer."""
        return self.train(False)

    # --- forward and backward ------------------------------------------------------------

    def __call__(self, x: ArrayT, /, *, mask: AnyArray | None = None) -> ArrayT:
        """Same as :meth:`forward`."""
        return self.forward(x, mask=mask)

    def forward(self, x: ArrayT, /, *, mask: AnyArray | None = None) -> ArrayT:
        """Normalize ``x``, updating the running statistics in training mode.

        Parameters
        ----------
        x : array
            Input with the channels on ``axis``, at least 2-D, real floating.
        mask : array or None, optional
            Boolean, broadcastable to ``x``: True where a value counts for the
            batch statistics (padding False), as Keras' and Flax' ``mask``. The
            output is computed everywhere; :meth:`backward` uses the same mask.

        Returns
        -------
        array
            ``y``, with x's shape and dtype, in x's library and on its device.

        Raises
        ------
        TypeError
            ``x`` not an array, of another library than the layer's, or of a
            dtype the parameters do not match.
        ValueError
            ``x`` with fewer than 2 dimensions, ``axis`` out of range, a channel
            count other than ``num_features``, one value per channel in training.
        """
        if mask is None and (self.comm is None or not self.training):
            with self._lock:
                hit = self._forward_resolved(x)
            if hit is not None:
                return hit
        return self._forward_checked(x, mask)

    @reports_failures  # with comm=: a rank whose x fails these checks fails every rank
    def _forward_checked(self, x: ArrayT, mask: AnyArray | None) -> ArrayT:
        """:meth:`forward` with every check: the first call, and any whose kind changed."""
        with self._lock:  # read, compute, commit: one update at a time
            storage = self._placement_for(x)
            xp = storage.xp
            axes = normalize_axes(self.axis, x.ndim)
            axis: int | tuple[int, ...] = axes[0] if len(axes) == 1 else axes
            channels: Any = param_shape(tuple(x.shape), axes)
            channels = channels[0] if len(axes) == 1 else channels
            if self.num_features is not None and channels != self.num_features:
                raise ValueError(
                    f"x has {channels} channels on axis {self.axis} (shape {tuple(x.shape)}) "
                    f"but this BatchNorm has num_features={self.num_features}"
                )
            training = check_training(self.training)
            arrays = self._arrays_in(storage, channels)
            update = training and self.track_running_stats
            count = self.num_batches_tracked
            factor = 0.0
            if update:
                assert count is not None
                if count >= _COUNTER_MAX:
                    raise OverflowError(
                        f"num_batches_tracked is {count}: one more batch would not fit int64"
                    )
                count += 1
                factor = 1.0 / count if self.momentum is None else self.momentum
            use_batch_stats = training or not self.track_running_stats
            comm = self.comm if training else None
            if comm is None and mask is None:
                # The one validation of the call; kept (per thread) for the next calls
                # with the same kind of x (see _forward_resolved).
                call, _ = resolve_forward(
                    x, arrays.running_mean, arrays.running_var, arrays.weight, arrays.bias,
                    training=use_batch_stats, momentum=factor, eps=self.eps, axis=axis,
                    mask=None, var_estimator=self.var_estimator, xp=xp,
                )  # fmt: skip
                out = kernels.forward(
                    call, x, arrays.running_mean, arrays.running_var, arrays.weight, arrays.bias
                )
            else:
                call = None
                out = batch_norm(
                    x,
                    arrays.running_mean,
                    arrays.running_var,
                    arrays.weight,
                    arrays.bias,
                    training=use_batch_stats,
                    momentum=factor,
                    eps=self.eps,
                    axis=axis,
                    mask=mask,
                    var_estimator=self.var_estimator,
                    comm=comm,
                    xp=xp,
                )
            mean, invstd = out.mean, out.invstd
            if update:
                new_mean, new_var = out.new_running_mean, out.new_running_var
                if compat.is_dask_array(new_mean):  # computed now, with the saved statistics
                    new_mean, new_var, mean, invstd = _materialised(new_mean, new_var, mean, invstd)
                arrays = arrays._replace(running_mean=new_mean, running_var=new_var)
            _check_storable(arrays)
            # Everything succeeded: commit.
            if update:
                self.num_batches_tracked = count
            self._storage = storage
            self.num_features = channels
            self._set_arrays(arrays)
            self._local.saved = _Saved(
                xp, x, arrays.weight, mean, invstd, use_batch_stats, axis, comm, mask
            )
            if compat.is_torch_array(x):
                _RESOLVED_TYPES.add(type(x))
            self._local.resolved = (
                None
                if call is None or type(x) not in _RESOLVED_TYPES
                else _Kept(
                    type(x), tuple(x.shape), x.dtype, getattr(x, "device", None), storage,
                    self._options(), arrays, _kinds(arrays), call, update,
                )
            )  # fmt: skip
        return out.y

    def _options(self) -> tuple[Any, ...]:
        """The options a kept call was resolved with (compared by identity, see _Kept)."""
        return (
            self.training, self.track_running_stats, self.axis, self.eps,
            self.var_estimator, self.momentum,
        )  # fmt: skip

    def _forward_resolved(self, x: Any) -> Array | None:
        """The forward on the call kept from the last one with the same kind of x, or None.

        NumPy arrays and torch tensors only (their ``shape``, ``dtype`` and ``device``
        are cheap and decide everything the checks looked at); the running update,
        the counter and the commit are those of :meth:`forward`.
        """
        kept: _Kept | None = getattr(self._local, "resolved", None)
        if (
            kept is None
            or type(x) is not kept.x_type
            or x.shape != kept.shape
            or x.dtype != kept.dtype
            or getattr(x, "device", None) != kept.device
            or self._storage is not kept.storage
            or not all(map(operator.is_, self._options(), kept.options))
        ):
            return None
        arrays = self._arrays()
        if not all(map(operator.is_, arrays, kept.arrays)) and _kinds(arrays) != kept.kinds:
            return None
        call = kept.call
        if kept.update:
            count = self.num_batches_tracked
            assert count is not None
            if count >= _COUNTER_MAX:
                return None  # forward raises
            count += 1
            if self.momentum is None:
                call = call._replace(momentum=1.0 / count)
        out = kernels.forward(
            call, x, arrays.running_mean, arrays.running_var, arrays.weight, arrays.bias
        )
        if kept.update:
            arrays = _Arrays(arrays.weight, arrays.bias, out.new_running_mean, out.new_running_var)
            self.num_batches_tracked = count
            self._set_arrays(arrays)
            self._local.resolved = kept._replace(arrays=arrays)
        self._local.saved = _Saved(
            call.xp, x, arrays.weight, out.mean, out.invstd, call.training, call.axis
        )
        return out.y

    def backward(self, dy: AnyArray, /) -> BatchNormGrads:
        """Gradients of the last forward with respect to its input and parameters.

        Parameters
        ----------
        dy : array
            Gradient of the loss with respect to the last forward's output.

        Returns
        -------
        BatchNormGrads
            ``(dx, dweight, dbias)``, as from :func:`anybn.batch_norm_backward`:
            through the batch statistics if the last forward used them, with
            the running statistics as constants if it used those. ``dweight``
            and ``dbias`` are computed even when ``affine=False``.

        Raises
        ------
        RuntimeError
            If there was no successful forward yet.
        TypeError, ValueError
            ``dy`` of another library, device or shape than that input.
        """
        saved = self._saved
        if saved is None:
            raise RuntimeError(
                "backward() needs a forward first: call the layer on a batch, then "
                "backward(dy) with the gradient of its output"
            )
        return batch_norm_backward(
            dy,
            saved.x,
            saved.weight,
            saved.mean,
            saved.invstd,
            training=saved.training,
            axis=saved.axis,
            mask=saved.mask,
            comm=saved.comm,
            xp=saved.xp,
        )

    # --- state ---------------------------------------------------------------------------

    def _state_keys(self) -> tuple[str, ...]:
        keys: tuple[str, ...] = ("weight", "bias") if self.affine else ()
        if self.track_running_stats:
            keys += ("running_mean", "running_var", _COUNTER)
        return keys

    def reset_running_stats(self) -> None:
        """Reset ``running_mean`` to 0, ``running_var`` to 1, ``num_batches_tracked`` to 0."""
        if not self.track_running_stats:
            return
        self.num_batches_tracked = 0
        if self.num_features is not None:
            fresh = self._fresh(self.num_features, self._placement())
            self.running_mean, self.running_var = fresh.running_mean, fresh.running_var

    def reset_parameters(self) -> None:
        """Reset the running statistics and ``weight`` to 1, ``bias`` to 0."""
        self.reset_running_stats()
        if self.affine and self.num_features is not None:
            fresh = self._fresh(self.num_features, self._placement())
            self.weight, self.bias = fresh.weight, fresh.bias

    def state_dict(self) -> dict[str, Array]:
        """A snapshot of the parameters and buffers, under PyTorch's keys.

        Returns
        -------
        dict
            ``weight``, ``bias`` (if ``affine``), ``running_mean``, ``running_var``
            and ``num_batches_tracked`` (if ``track_running_stats``): copies in
            the layer's library and on its device, the counter a 0-d int64
            array like torch's. Unlike torch's, the values are copies, so that
            later in-place updates of the layer do not reach the snapshot.

        Raises
        ------
        RuntimeError
            If ``num_features`` is still unknown (no input and no state loaded).

        Examples
        --------
        >>> import numpy as np
        >>> import anybn
        >>> sd = anybn.BatchNorm(3, affine=False, xp=np, dtype="float32").state_dict()
        >>> sd
        {'running_mean': array([0., 0., 0.], dtype=float32), 'running_var': array([1., 1., 1.],
        dtype=float32), 'num_batches_tracked': array(0)}
        """
        keys = self._state_keys()
        if self.num_features is None and keys != ():
            raise RuntimeError(
                "state_dict() of a BatchNorm with num_features=None needs a forward "
                "or a load_state_dict first, to know the number of channels"
            )
        xp, device, _ = self._placement()
        state: dict[str, Array] = {}
        with self._lock:
            for key, a in self._arrays()._asdict().items():
                if a is not None:
                    state[key] = xp.asarray(stop_gradient(a), copy=True)
            if self.num_batches_tracked is not None:
                state[_COUNTER] = xp.asarray(
                    self.num_batches_tracked, dtype=xp.int64, device=device
                )
        return {key: state[key] for key in keys}

    def load_state_dict(
        self, state_dict: Mapping[str, Any], /, *, strict: bool = True
    ) -> IncompatibleKeys:
        """Copy parameters and buffers from a state dict of any array library.

        Parameters
        ----------
        state_dict : mapping
            The keys of :meth:`state_dict` (PyTorch's keys for the same
            ``affine`` and ``track_running_stats``), with per-channel arrays of
            shape ``(num_features,)`` from any library (NumPy, torch tensors on
            any device, CuPy, ...) and ``num_batches_tracked`` as an int or 0-d
            integer array in [0, 2**63 - 1]. The values are converted to the
            layer's library, device and dtype, and copied: later changes to them
            never reach the layer. With ``num_features=None`` the shapes decide it.
            A state dict without ``num_batches_tracked`` (PyTorch checkpoints
            from before 0.4.1) loads and leaves the counter as it is, as torch does.
        strict : bool, optional
            Whether missing or unexpected keys are an error (True, the default),
            or are reported in the result and skipped (False), as in torch.

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``, both empty after a strict load.

        Raises
        ------
        TypeError
            Not a mapping, or a value that is not a real array or counter.
        ValueError
            Missing or unexpected keys (with ``strict=True``), wrong shapes, a
            counter outside int64's non-negative range, a ragged list.

        Examples
        --------
        >>> import numpy as np
        >>> import anybn
        >>> bn = anybn.BatchNorm(2, xp=np)
        >>> bn.load_state_dict({"weight": [2.0, 3.0], "bias": np.zeros(2),
        ...                     "running_mean": np.ones(2), "running_var": np.ones(2),
        ...                     "num_batches_tracked": 7})
        IncompatibleKeys(missing_keys=[], unexpected_keys=[])
        >>> bn.weight, bn.num_batches_tracked
        (array([2., 3.]), 7)
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {_describe(state_dict)}")
        strict = check_bool(strict, "strict")
        keys = self._state_keys()
        # A missing counter is an old checkpoint's, not an error (torch's rule).
        missing = [k for k in keys if k not in state_dict and k != _COUNTER]
        unexpected = [k for k in state_dict if k not in keys]
        if strict and (missing or unexpected):
            raise ValueError(
                f"state_dict does not match this BatchNorm (affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}): missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        vectors = {
            k: _source_vector(state_dict[k], k, isinstance(self.axis, tuple))
            for k in keys
            if k != _COUNTER and k in state_dict
        }
        def features(shape: tuple[int, ...]) -> int | tuple[int, ...]:
            return shape[0] if len(shape) == 1 else shape

        lengths = {k: features(tuple(a.shape)) for k, a in vectors.items()}
        channels = self.num_features
        if channels is None and lengths:
            channels = next(iter(lengths.values()))
        wrong = {k: n for k, n in lengths.items() if n != channels}
        if wrong:
            def shape_of(n: Any) -> tuple[int, ...]:
                return (n,) if isinstance(n, int) else tuple(n)

            raise ValueError(
                f"state_dict arrays must have shape {shape_of(channels)} for "
                f"num_features={channels}; "
                + ", ".join(f"{k!r} has shape {shape_of(n)}" for k, n in wrong.items())
            )
        count = self.num_batches_tracked
        if self.track_running_stats and _COUNTER in state_dict:
            count = _source_counter(state_dict[_COUNTER])
        with self._lock:
            storage = self._placement()
            loaded = {k: _convert(a, storage) for k, a in vectors.items()}
            # Everything is checked and converted: commit.
            if channels is not None:
                current = (
                    self._arrays()
                    if self.num_features is not None
                    else self._fresh(channels, storage)
                )
                self._set_arrays(current._replace(**loaded))
            self.num_features = channels
            self.num_batches_tracked = count
        return IncompatibleKeys(missing, unexpected)

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
            + (
                ""
                if self.var_estimator == "unbiased"
                else f", var_estimator={self.var_estimator!r}"
            )
            + ")"
        )
