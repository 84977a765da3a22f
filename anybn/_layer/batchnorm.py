"""The stateful layer: :class:`BatchNorm`, for arrays of any array-API library.

The layer owns what the functional core does not: the parameters (``weight``,
``bias``), the buffers (``running_mean``, ``running_var``, ``num_batches_tracked``),
the train/eval mode and what ``backward`` needs from the last forward. Every
computation is a call to the functional core on a resolved call (:mod:`anybn._call`);
which statistics a call uses and how the running ones are updated are PyTorch's
module rules (:mod:`anybn._layer.rules`); where the arrays live is
:mod:`anybn._layer.placement`; state dicts, copies and pickles are
:mod:`anybn._layer.state`.
"""

from __future__ import annotations

import numbers
import operator
import sys
import threading
import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple

import array_api_compat as compat
import numpy as np

from .. import _kernels as kernels
from .._api import BatchNormGrads, batch_norm, batch_norm_backward
from .._call import resolve_forward, resolve_timeout
from .._checks import (
    check_bool,
    check_eps,
    check_input,
    check_momentum,
    check_training,
    check_var_estimator,
)
from .._typing import AnyArray, ArrayT
from .._variants import check_clipping, check_renorm_momentum, check_virtual_batch_size
from .._xp import (
    Array,
    check_namespace,
    compute_dtype,
    dtype_name,
    is_concrete,
    normalize_axes,
    param_shape,
    same_dtype,
)
from ..distributed.sync import reports_failures
from . import state as _state
from .placement import (
    Arrays,
    Storage,
    check_dtype,
    convert,
    describe,
    materialised,
    namespace_of,
    resolve_dtype,
)
from .rules import COUNTER_MAX, running_factor, uses_batch_stats
from .state import IncompatibleKeys

__all__ = ["BatchNorm", "IncompatibleKeys"]

#: Input types whose calls the layer keeps resolved between calls (see _forward_resolved):
#: NumPy arrays, and torch tensors once one has come.
_RESOLVED_TYPES: set[type] = {np.ndarray}


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
    timeout: float | None = None
    axis_name: Any = None
    axis_index_groups: Any = None
    renorm_r: Array | None = None
    renorm_d: Array | None = None
    virtual_batch_size: int | None = None


def _kinds(arrays: Arrays) -> tuple[Any, ...]:
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
    storage: Storage
    options: tuple[Any, ...]
    arrays: Arrays
    kinds: tuple[Any, ...]
    call: Any
    update: bool


def _check_storable(arrays: Arrays) -> None:
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


def _check_frozen(frozen: object, track_running_stats: bool, name: str = "frozen") -> bool:
    value = check_bool(frozen, name)
    if value and not track_running_stats:
        raise ValueError(
            "a BatchNorm with track_running_stats=False has no running statistics to "
            "freeze: it normalizes with each batch's own statistics"
        )
    return value


def _check_axis(axis: object) -> int | tuple[int, ...]:
    if isinstance(axis, (tuple, list)):
        if not axis:
            raise ValueError("axis must name at least one channel axis, got an empty sequence")
        return tuple(_check_axis(a) for a in axis)  # type: ignore[misc]
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    return int(axis)


def _library(xp: ModuleType) -> str:
    """A namespace as users name its library: ``array_api_compat.numpy`` -> ``numpy``."""
    return xp.__name__.removeprefix("array_api_compat.")


def _channels_message(x: Any, axis: Any, channels: Any, num_features: Any) -> str:
    """The channel-count mismatch, with the axis that has ``num_features`` where one does."""
    message = (
        f"x has {channels} channels on axis {axis} (shape {tuple(x.shape)}) but this "
        f"BatchNorm has num_features={num_features}"
    )
    if isinstance(num_features, int):
        matches = [d - x.ndim for d in range(x.ndim) if x.shape[d] == num_features]
        if matches and matches[-1] == -1:
            return message + (
                f"; x's last axis has {num_features}: for channels-last input "
                "(N, ..., C), create the layer with axis=-1"
            )
        if matches:
            return message + (
                f"; x's axis {matches[-1] + x.ndim} has {num_features}: create the layer "
                f"with axis={matches[-1] + x.ndim} if the channels are there"
            )
    return message


def _warn_if_channels_last(x: Any) -> None:
    """Warn when a layer without num_features binds to what looks like a channels-last image.

    ``(N, H, W, C)`` with ``H == W != C`` (and ``(N, D, H, W, C)`` with ``D == H == W``)
    would give the layer ``H`` channels on the default ``axis=1``.
    """
    shape = tuple(x.shape)
    if len(shape) not in (4, 5):
        return
    spatial = shape[1:-1]
    if len(set(spatial)) == 1 and shape[-1] != shape[1]:
        warnings.warn(
            f"BatchNorm() takes its channel count from axis 1 of its first input: {shape[1]} "
            f"channels from x of shape {shape}, whose axes look like an image's "
            f"{'(N, H, W, C)' if len(shape) == 4 else '(N, D, H, W, C)'}. If x is "
            "channels-last, create the layer with axis=-1; give num_features to silence "
            "this warning",
            UserWarning,
            stacklevel=_user_stacklevel(),
        )


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first caller outside anybn, for warnings raised inside."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("anybn"):
        frame, level = frame.f_back, level + 1
    return level


def _check_x_dtype(x: Any, storage: Storage, dtype_given: bool) -> None:
    """x's dtype against the layer's arrays: x's own dtype, or float32 for half x."""
    held = storage.dtype
    if same_dtype(held, x.dtype) or same_dtype(held, compute_dtype(storage.xp, x.dtype)):
        return
    raise TypeError(
        f"x has dtype {dtype_name(x.dtype)} but this BatchNorm's parameters and running "
        f"statistics are {dtype_name(held)} ("
        + ("its dtype=" if dtype_given else "bound by its first input")
        + f"): pass x as {dtype_name(held)} (for example x.astype({dtype_name(held)}), "
        f"x.to(torch.{dtype_name(held)})), or create the layer with "
        f"dtype={dtype_name(x.dtype)}"
    )


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
        Every rank then holds the same running statistics. Masks, several channel
        axes and either ``var_estimator`` are synchronized too (a rank whose mask
        is all False contributes nothing). None: local.
    timeout : float or datetime.timedelta, optional
        With ``comm``: how long a rank waits for the others in each synchronized
        call, as for :func:`anybn.batch_norm` (None: the engine's default). A
        forward that times out raises :class:`anybn.distributed.CollectiveTimeout`
        on every rank and leaves the layer as it was.
    axis_name : str or tuple of str, optional
        JAX only: synchronize the batch statistics over the devices of this named
        axis (``jax.pmap``, ``jax.shard_map``) in training, as for
        :func:`anybn.batch_norm`. The layer keeps state and runs eagerly, so inside
        those transformations only a layer without running statistics
        (``track_running_stats=False``) trains; keep the running statistics as
        explicit state with :func:`anybn.batch_norm` otherwise.
    axis_index_groups : sequence of sequences of int, optional
        With ``axis_name``: the groups of devices that share statistics.
    var_estimator : {"unbiased", "biased"}, optional
        The variance the running variance accumulates: unbiased (PyTorch,
        Chainer; the default) or biased (Keras, Flax; see
        :mod:`anybn.convert` for their checkpoints).
    frozen : bool, optional
        Normalize with the running statistics in training mode too, and never
        update them (see :meth:`freeze`); needs ``track_running_stats=True``.
    renorm : bool, optional
        Batch renormalization (Ioffe 2017), as Keras 3's ``renorm=True``: in training
        ``y = ((x - mean_B) / std_B * r + d) * weight + bias`` with the corrections
        ``r = std_B / renorm_std`` and ``d = (mean_B - renorm_mean) / renorm_std``,
        clipped, constants in :meth:`backward`; eval is unchanged. The layer keeps
        three more buffers (``running_std``, ``renorm_mean``, ``renorm_std``, in the
        state dict too) and needs ``track_running_stats=True``. See
        :func:`anybn.batch_norm` for the formulas and the updates.
    renorm_clipping : dict, optional
        Keras' clipping of the corrections: keys among ``"rmin"``, ``"rmax"``,
        ``"dmax"`` (missing: 0, inf, inf), with ``rmin <= 1 <= rmax`` and
        ``dmax >= 0``. Read at each forward: assign a new dict (or change this
        one) between steps for the paper's schedule of rmax and dmax.
    renorm_momentum : float, optional
        The weight of the batch statistics in the update of ``renorm_mean`` and
        ``renorm_std`` (Keras' ``renorm_momentum=0.99`` is 0.01 here).
    virtual_batch_size : int, optional
        Ghost batch norm (Keras 2's ``virtual_batch_size``): in training the batch
        statistics are those of groups of this many samples (sample ``i`` in group
        ``i % (N // k)``), the running statistics updated once per step from the
        groups' mean statistics; the batch size must be a multiple of it. Eval is
        unchanged. Not combinable with ``comm`` or ``axis_name``.

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
    frozen : bool
        Whether the running statistics are used, and left as they are, in training
        too; see :meth:`freeze`.

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

    #: Class-level defaults, for layers pickled before these attributes existed.
    frozen: bool = False
    #: The recorder of a running :func:`anybn.recalibrate` (never copied or pickled).
    _recorder: Any = None

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
        frozen: bool = False,
        timeout: Any = None,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        renorm: bool = False,
        renorm_clipping: Mapping[str, float] | None = None,
        renorm_momentum: float = 0.01,
        virtual_batch_size: int | None = None,
    ) -> None:
        self.renorm = check_bool(renorm, "renorm")
        if self.renorm:
            check_clipping(renorm_clipping)
            check_renorm_momentum(renorm_momentum)
            if not track_running_stats:
                raise ValueError(
                    "renorm=True needs running statistics (the corrections are taken "
                    "against them): pass track_running_stats=True"
                )
        self.renorm_clipping = renorm_clipping
        self.renorm_momentum = renorm_momentum
        self.virtual_batch_size = check_virtual_batch_size(virtual_batch_size)
        if self.virtual_batch_size is not None and (comm is not None or axis_name is not None):
            raise ValueError(
                "virtual_batch_size cannot be combined with comm= or axis_name=: ghost "
                "batches are groups of one process's samples (see anybn.batch_norm)"
            )
        self.num_features = _check_num_features(num_features)
        self.var_estimator = check_var_estimator(var_estimator)
        self.axis = _check_axis(axis)
        self.eps = check_eps(eps)
        self.momentum = None if momentum is None else check_momentum(momentum)
        self.affine = check_bool(affine, "affine")
        self.track_running_stats = check_bool(track_running_stats, "track_running_stats")
        self.training = True
        self.frozen = _check_frozen(frozen, self.track_running_stats)
        self._device = device
        self._dtype = check_dtype(dtype)
        self._storage: Storage | None = None
        self._xp_given = xp is not None
        if xp is not None:
            xp = namespace_of(check_namespace(xp))
            floating = xp.__array_namespace_info__().default_dtypes(device=device)["real floating"]
            self._storage = Storage(
                xp, device, floating if dtype is None else resolve_dtype(xp, dtype)
            )
        self.weight: Array | None = None
        self.bias: Array | None = None
        self.running_mean: Array | None = None
        self.running_var: Array | None = None
        self.num_batches_tracked: int | None = 0 if self.track_running_stats else None
        self._lock = threading.RLock()
        self._local = threading.local()
        self.comm = comm
        self.timeout = None if timeout is None else resolve_timeout(timeout)
        if axis_index_groups is not None and axis_name is None:
            raise ValueError("axis_index_groups needs axis_name (the named axis it splits)")
        if axis_name is not None and comm is not None:
            raise ValueError(
                "comm= (processes) and axis_name= (JAX devices) cannot be combined; pass one"
            )
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        if self.num_features is not None:
            self._set_arrays(self._fresh(self.num_features, self._placement()))

    # --- where the arrays live -----------------------------------------------------------

    def _placement(self) -> Storage:
        """Where the arrays live now: the layer's library, or NumPy placeholders."""
        if self._storage is not None:
            return self._storage
        np_xp = compat.array_namespace(np.empty(0))
        try:
            dtype = resolve_dtype(np_xp, self._dtype) if self._dtype is not None else np.float64
        except TypeError:  # a dtype NumPy lacks (bfloat16): hold float64 until bound
            dtype = np.float64
        return Storage(np_xp, None, dtype)

    def _placement_for(self, x: Array) -> Storage:
        """Where the arrays must live to process ``x``; raises if ``x`` cannot be processed."""
        if not compat.is_array_api_obj(x):
            raise TypeError(f"x must be an array (NumPy, CuPy, PyTorch, ...), got {describe(x)}")
        xp = compat.array_namespace(x)
        if self._storage is not None and xp is not self._storage.xp:
            raise TypeError(
                f"this BatchNorm holds {_library(self._storage.xp)} arrays ("
                + ("its xp=" if self._xp_given else "bound by its first input")
                + f"), got x of type {describe(x)}: pass x as a {_library(self._storage.xp)} "
                "array, or, to go on in another library, load this layer's state_dict() into "
                "a new BatchNorm, which binds to its first input's library"
            )
        check_input(xp, x)
        if self._storage is not None:
            return self._storage
        device = compat.device(x) if self._device is None else self._device
        if self._dtype is None:
            return Storage(xp, device, compute_dtype(xp, x.dtype))
        return Storage(xp, device, resolve_dtype(xp, self._dtype))

    def _fresh(self, channels: int | tuple[int, ...], storage: Storage) -> Arrays:
        """Initial arrays: weight 1, bias 0, running_mean 0, running_var 1."""
        xp, device, dtype = storage

        shape = (channels,) if isinstance(channels, int) else tuple(channels)

        def full(value: float, present: bool) -> Array | None:
            return xp.full(shape, value, dtype=dtype, device=device) if present else None

        renorm = getattr(self, "renorm", False)
        arrays = Arrays(
            full(1.0, self.affine),
            full(0.0, self.affine),
            full(0.0, self.track_running_stats),
            full(1.0, self.track_running_stats),
            full(1.0, renorm),  # Keras: sqrt of the running variance's initial 1
            full(0.0, renorm),
            full(1.0, renorm),
        )
        if compat.is_dask_namespace(xp):  # the layer holds values, not graphs (see forward)
            present = [a for a in arrays if a is not None]
            done = iter(materialised(*present))
            arrays = Arrays(*(None if a is None else next(done) for a in arrays))
        return arrays

    def _arrays(self) -> Arrays:
        return Arrays(
            self.weight, self.bias, self.running_mean, self.running_var,
            getattr(self, "running_std", None), getattr(self, "renorm_mean", None),
            getattr(self, "renorm_std", None),
        )  # fmt: skip

    def _set_arrays(self, arrays: Arrays) -> None:
        self.weight, self.bias, self.running_mean, self.running_var = arrays[:4]
        self.running_std, self.renorm_mean, self.renorm_std = arrays[4:]

    def _arrays_in(self, storage: Storage, channels: int) -> Arrays:
        """The current arrays moved to ``storage`` (fresh ones if there are none yet)."""
        if self.num_features is None:
            return self._fresh(channels, storage)
        if storage == self._storage:
            return self._arrays()
        return Arrays(*(None if a is None else convert(a, storage) for a in self._arrays()))

    @property
    def _saved(self) -> _Saved | None:
        """What the calling thread's last successful forward left for :meth:`backward`."""
        return getattr(self._local, "saved", None)

    # --- copying and pickling ------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """The layer's state, picklable: the library by module name, no lock, no saved forward.

        A copy (``copy.deepcopy``, ``pickle``) has the parameters, buffers,
        counter and mode of the original; it needs a forward of its own before
        ``backward``. A deep copy shares the original's ``comm`` (a communicator
        belongs to its process); pickling a layer whose ``comm`` is a
        communicator object (not None, ``"torch"`` or ``"mpi"``) raises TypeError.
        """
        return _state.picklable_state(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> BatchNorm:
        return _state.deep_copy(self, memo)

    def __setstate__(self, state: dict[str, Any]) -> None:
        _state.restore(self, state)

    # --- mode ----------------------------------------------------------------------------

    def train(self, mode: bool = True) -> BatchNorm:
        """Set training mode (``mode=True``) or eval mode; return the layer."""
        self.training = check_bool(mode, "mode")
        return self

    def eval(self) -> BatchNorm:
        """Set eval mode; return the layer."""
        return self.train(False)

    def freeze(self, mode: bool = True) -> BatchNorm:
        """Freeze the running statistics (``mode=True``) or unfreeze them; return the layer.

        A frozen layer normalizes with its running statistics in training mode too
        (the eval-mode forward), never updates them nor ``num_batches_tracked``, and
        synchronizes nothing (``comm`` is not used); :meth:`backward` still gives
        ``dx``, ``dweight`` and ``dbias``, through the running statistics as constants.
        This is Keras' ``BatchNormalization`` with ``trainable=False`` (which runs in
        inference mode), Flax's ``use_running_average=True`` and torchvision's
        ``FrozenBatchNorm2d``, with the affine parameters still trained.

        Raises
        ------
        ValueError
            Freezing a layer without running statistics (``track_running_stats=False``);
            the layer is left as it was.

        Examples
        --------
        >>> import numpy as np
        >>> import anybn
        >>> bn = anybn.BatchNorm(2, xp=np).freeze()
        >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
        >>> bn(x)  # the running statistics (0 and 1) in training mode
        array([[ 0.99999...,  9.99995...],
               [ 2.99998..., 29.99985...]])
        >>> bn.running_mean, bn.num_batches_tracked
        (array([0., 0.]), 0)
        >>> bn.backward(np.ones_like(x)).dbias
        array([2., 2.])
        """
        self.frozen = _check_frozen(mode, self.track_running_stats, name="mode")
        return self

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
            Boolean: True where a value counts for the batch statistics (padding
            False), as Keras' and Flax' ``mask``; of x's shape, a shape that
            broadcasts to it, or x's shape without the channel axes (Keras'
            ``(batch, time)`` mask for ``(batch, time, features)``). The output is
            computed everywhere; :meth:`backward` uses the same mask. With
            ``comm``, every rank passes a mask or none.

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
        recorder = self._recorder
        if recorder is not None:  # anybn.recalibrate is running
            return recorder.forward(self, x, mask)
        if (
            mask is None
            and not self.renorm
            and self.virtual_batch_size is None
            and (self.comm is None or not self.training or self.frozen)
            and (
                self.axis_name is None
                or self.frozen
                or not uses_batch_stats(self.training, self.track_running_stats)
            )
        ):
            with self._lock:
                hit = self._forward_resolved(x)
            if hit is not None:
                return hit
        if self.frozen:  # nothing synchronized, so no rank to tell of a failure either
            return self._forward_local(x, mask)
        return self._forward_checked(x, mask)

    def _forward_local(self, x: ArrayT, mask: AnyArray | None) -> ArrayT:
        """:meth:`forward` with every check: the first call, and any whose kind changed."""
        with self._lock:  # read, compute, commit: one update at a time
            storage = self._placement_for(x)
            xp = storage.xp
            axes = normalize_axes(self.axis, x.ndim)
            axis: int | tuple[int, ...] = axes[0] if len(axes) == 1 else axes
            channels: Any = param_shape(tuple(x.shape), axes)
            channels = channels[0] if len(axes) == 1 else channels
            if self.num_features is not None and channels != self.num_features:
                raise ValueError(_channels_message(x, self.axis, channels, self.num_features))
            if self.num_features is None and axes == (1,):
                _warn_if_channels_last(x)
            _check_x_dtype(x, storage, self._dtype is not None)
            # A frozen layer computes as in eval (check_frozen: it has running statistics).
            training = check_training(self.training) and not _check_frozen(
                self.frozen, self.track_running_stats, name="frozen"
            )
            arrays = self._arrays_in(storage, channels)
            update = training and self.track_running_stats
            count = self.num_batches_tracked
            factor = 0.0
            if update:
                assert count is not None
                if count >= COUNTER_MAX:
                    raise OverflowError(
                        f"num_batches_tracked is {count}: one more batch would not fit int64"
                    )
                count += 1
                factor = running_factor(self.momentum, count)
            use_batch_stats = uses_batch_stats(training, self.track_running_stats)
            comm = self.comm if training else None
            axis_name = self.axis_name if use_batch_stats else None
            groups = self.axis_index_groups if axis_name is not None else None
            variant = self.renorm or self.virtual_batch_size is not None
            out: Any  # BatchNormOutput, or RenormOutput with renorm
            if comm is None and mask is None and axis_name is None and not variant:
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
            elif variant:
                call = None
                out = batch_norm(
                    x, arrays.running_mean, arrays.running_var, arrays.weight, arrays.bias,
                    training=use_batch_stats, momentum=factor, eps=self.eps, axis=axis,
                    mask=mask, var_estimator=self.var_estimator, renorm=self.renorm,
                    renorm_clipping=self.renorm_clipping if self.renorm else None,
                    renorm_momentum=self.renorm_momentum, renorm_mean=arrays.renorm_mean,
                    renorm_std=arrays.renorm_std, running_std=arrays.running_std,
                    virtual_batch_size=self.virtual_batch_size if use_batch_stats else None,
                    comm=comm, timeout=self.timeout if comm is not None else None, xp=xp,
                )  # fmt: skip
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
                    timeout=self.timeout if comm is not None else None,
                    axis_name=axis_name,
                    axis_index_groups=groups,
                    xp=xp,
                )
            mean, invstd = out.mean, out.invstd
            r = d = None
            if self.renorm and use_batch_stats:
                r, d = out.r, out.d
            if update:
                new = {"running_mean": out.new_running_mean, "running_var": out.new_running_var}
                if self.renorm:
                    new.update(
                        running_std=out.new_running_std, renorm_mean=out.new_renorm_mean,
                        renorm_std=out.new_renorm_std,
                    )  # fmt: skip
                if compat.is_dask_array(out.new_running_mean):  # computed now, with the saved
                    done = materialised(*new.values(), mean, invstd)  # statistics
                    new = dict(zip(new, done[:-2], strict=True))
                    mean, invstd = done[-2:]
                arrays = arrays._replace(**new)
            _check_storable(arrays)
            # Everything succeeded: commit.
            if update:
                self.num_batches_tracked = count
            self._storage = storage
            self.num_features = channels
            self._set_arrays(arrays)
            self._local.saved = _Saved(
                xp, x, arrays.weight, mean, invstd, use_batch_stats, axis, comm, mask,
                self.timeout if comm is not None else None, axis_name, groups, r, d,
                self.virtual_batch_size if use_batch_stats else None,
            )  # fmt: skip
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

    #: with comm=: a rank whose x fails these checks fails every rank
    _forward_checked = reports_failures(_forward_local)

    def _options(self) -> tuple[Any, ...]:
        """The options a kept call was resolved with (compared by identity, see _Kept)."""
        return (
            self.training, self.track_running_stats, self.axis, self.eps,
            self.var_estimator, self.momentum, self.frozen, self.axis_name,
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
            if count >= COUNTER_MAX:
                return None  # forward raises
            count += 1
            if self.momentum is None:
                call = call._replace(momentum=running_factor(None, count))
        out = kernels.forward(
            call, x, arrays.running_mean, arrays.running_var, arrays.weight, arrays.bias
        )
        if kept.update:
            arrays = arrays._replace(
                running_mean=out.new_running_mean, running_var=out.new_running_var
            )
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
            timeout=saved.timeout,
            axis_name=saved.axis_name,
            axis_index_groups=saved.axis_index_groups,
            renorm_r=saved.renorm_r,
            renorm_d=saved.renorm_d,
            virtual_batch_size=saved.virtual_batch_size,
            xp=saved.xp,
        )

    # --- state ---------------------------------------------------------------------------

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
        return _state.state_dict(self)

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
        return _state.load_state_dict(self, state_dict, strict=strict)

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
            + (", frozen=True" if self.frozen else "")
            + (", renorm=True" if getattr(self, "renorm", False) else "")
            + (
                f", virtual_batch_size={self.virtual_batch_size}"
                if getattr(self, "virtual_batch_size", None) is not None
                else ""
            )
            + ")"
        )
