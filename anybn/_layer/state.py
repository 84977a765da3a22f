"""A layer's state: state dicts (PyTorch's keys), copies and pickles.

The functions here take the layer (:class:`anybn.BatchNorm`) and implement its
``state_dict``, ``load_state_dict``, ``__getstate__``/``__setstate__`` and
``__deepcopy__``: values of any library converted to the layer's place and checked
before anything is committed, devices kept in a form that copies and pickles.
"""

from __future__ import annotations

import copy
import importlib
import numbers
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import array_api_compat as compat
import numpy as np

from .._checks import check_bool
from .._xp import Array, dtype_name, stop_gradient
from .placement import Arrays, Storage, convert, describe, namespace_of
from .rules import COUNTER, COUNTER_MAX

if TYPE_CHECKING:
    from .batchnorm import BatchNorm

__all__ = [
    "IncompatibleKeys",
    "copyable_state",
    "deep_copy",
    "load_state_dict",
    "picklable_state",
    "restore",
    "state_dict",
]


class IncompatibleKeys(NamedTuple):
    """What :meth:`BatchNorm.load_state_dict` returns, as torch's ``load_state_dict`` does."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class _JaxDevice(NamedTuple):
    """A JAX device in a form that copies and pickles (JAX's ``Device`` objects do not)."""

    platform: str
    id: int


def portable_device(device: Any) -> Any:
    """``device`` in a form ``copy.deepcopy`` and ``pickle`` accept (see :func:`live_device`)."""
    module = type(device).__module__.split(".")[0]
    if module in ("jax", "jaxlib") and hasattr(device, "platform") and hasattr(device, "id"):
        return _JaxDevice(device.platform, device.id)
    return device


def live_device(device: Any) -> Any:
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


def source_vector(value: Any, key: str, several_axes: bool = False) -> Array:
    """A state-dict entry for a per-channel array, checked to be a 1-D real array."""
    a = value
    if not compat.is_array_api_obj(a):
        if not isinstance(a, (list, tuple)):
            raise TypeError(f"state_dict[{key!r}] must be an array, got {describe(value)}")
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


def source_counter(value: Any) -> int:
    """The ``num_batches_tracked`` entry: a Python int or a 0-d integer array, >= 0."""
    if compat.is_array_api_obj(value):
        shape, dtype = tuple(value.shape), value.dtype
        if shape != () or not compat.array_namespace(value).isdtype(dtype, "integral"):
            raise TypeError(
                f"state_dict[{COUNTER!r}] must be a 0-d integer array or an int, got "
                f"dtype {dtype_name(dtype)} and shape {shape}"
            )
        count = int(value)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        count = int(value)
    else:
        raise TypeError(
            f"state_dict[{COUNTER!r}] must be a 0-d integer array or an int, "
            f"got {describe(value)}"
        )
    if not 0 <= count <= COUNTER_MAX:
        raise ValueError(
            f"state_dict[{COUNTER!r}] must be >= 0 and < 2**63 (it is stored as int64), "
            f"got {count}"
        )
    return count


def copyable_state(layer: BatchNorm) -> dict[str, Any]:
    """The layer's ``__dict__`` less the lock and the saved forward; the library by module
    name, devices in a form that copies (:func:`portable_device`)."""
    with layer._lock:
        state = layer.__dict__.copy()
    del state["_lock"], state["_local"]
    state.pop("_recorder", None)  # a running recalibration belongs to the original
    state["_device"] = portable_device(state.get("_device"))
    if layer._storage is not None:  # modules do not pickle: the namespace by name
        xp, device, dtype = layer._storage
        state["_storage"] = (xp.__name__, portable_device(device), dtype)
    return state


def picklable_state(layer: BatchNorm) -> dict[str, Any]:
    """:func:`copyable_state`; a communicator object (it belongs to its process) raises."""
    state = copyable_state(layer)
    comm = state.get("comm")
    if comm is not None and not isinstance(comm, str):
        raise TypeError(
            f"cannot pickle a BatchNorm whose comm is a {type(comm).__name__}: a "
            "communicator belongs to its process; set comm=None (or 'torch'/'mpi') "
            "before pickling and attach the new process's communicator after loading"
        )
    return state


def deep_copy(layer: BatchNorm, memo: dict[int, Any]) -> BatchNorm:
    """A deep copy of the layer that shares its ``comm``."""
    state = copyable_state(layer)
    comm = state.pop("comm", None)
    clone = type(layer).__new__(type(layer))
    memo[id(layer)] = clone
    clone.__setstate__({**copy.deepcopy(state, memo), "comm": comm})
    return clone


def restore(layer: BatchNorm, state: dict[str, Any]) -> None:
    """``__setstate__``: the library from its name, the arrays on their device again."""
    state["_device"] = live_device(state.get("_device"))
    if state.get("_storage") is not None:
        name, device, dtype = state["_storage"]
        xp = namespace_of(importlib.import_module(name))
        live = live_device(device)
        present = [k for k in Arrays._fields if state.get(k) is not None]
        if live is None and device is not None and present:  # gone: where JAX put them
            live = compat.device(state[present[0]])
        for key in present:  # JAX unpickles arrays onto its default device
            if live is not None and compat.device(state[key]) != live:
                state[key] = compat.to_device(state[key], live)
        state["_storage"] = Storage(xp, live, dtype)
    state.setdefault("var_estimator", "unbiased")  # pickles from before the option
    for key in ("timeout", "axis_name", "axis_index_groups"):  # (from before these options)
        state.setdefault(key, None)
    for key in ("virtual_batch_size", "renorm_clipping", "running_std", "renorm_mean"):
        state.setdefault(key, None)
    state.setdefault("renorm_std", None)
    state.setdefault("renorm", False)
    state.setdefault("renorm_momentum", 0.01)
    layer.__dict__.update(state)
    layer._lock = threading.RLock()
    layer._local = threading.local()


def state_keys(layer: BatchNorm) -> tuple[str, ...]:
    """The keys of the layer's state dict, PyTorch's for its ``affine`` and
    ``track_running_stats``."""
    keys: tuple[str, ...] = ("weight", "bias") if layer.affine else ()
    if layer.track_running_stats:
        keys += ("running_mean", "running_var", COUNTER)
    if getattr(layer, "renorm", False):
        keys += ("running_std", "renorm_mean", "renorm_std")
    return keys


def state_dict(layer: BatchNorm) -> dict[str, Array]:
    """:meth:`anybn.BatchNorm.state_dict`."""
    keys = state_keys(layer)
    if layer.num_features is None and keys != ():
        raise RuntimeError(
            "state_dict() of a BatchNorm with num_features=None needs a forward "
            "or a load_state_dict first, to know the number of channels"
        )
    xp, device, _ = layer._placement()
    state: dict[str, Array] = {}
    with layer._lock:
        for key, a in layer._arrays()._asdict().items():
            if a is not None:
                state[key] = xp.asarray(stop_gradient(a), copy=True)
        if layer.num_batches_tracked is not None:
            state[COUNTER] = xp.asarray(
                layer.num_batches_tracked, dtype=xp.int64, device=device
            )
    return {key: state[key] for key in keys}


def load_state_dict(
    layer: BatchNorm, state_dict: Mapping[str, Any], *, strict: bool = True
) -> IncompatibleKeys:
    """:meth:`anybn.BatchNorm.load_state_dict`: everything checked and converted before the
    commit."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {describe(state_dict)}")
    strict = check_bool(strict, "strict")
    keys = state_keys(layer)
    # A missing counter is an old checkpoint's, not an error (torch's rule).
    missing = [k for k in keys if k not in state_dict and k != COUNTER]
    unexpected = [k for k in state_dict if k not in keys]
    if strict and (missing or unexpected):
        raise ValueError(
            f"state_dict does not match this BatchNorm (affine={layer.affine}, "
            f"track_running_stats={layer.track_running_stats}): missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    vectors = {
        k: source_vector(state_dict[k], k, isinstance(layer.axis, tuple))
        for k in keys
        if k != COUNTER and k in state_dict
    }

    def features(shape: tuple[int, ...]) -> int | tuple[int, ...]:
        return shape[0] if len(shape) == 1 else shape

    lengths = {k: features(tuple(a.shape)) for k, a in vectors.items()}
    channels = layer.num_features
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
    count = layer.num_batches_tracked
    if layer.track_running_stats and COUNTER in state_dict:
        count = source_counter(state_dict[COUNTER])
    with layer._lock:
        storage = layer._placement()
        loaded = {k: convert(a, storage) for k, a in vectors.items()}
        # Everything is checked and converted: commit.
        if channels is not None:
            current = (
                layer._arrays()
                if layer.num_features is not None
                else layer._fresh(channels, storage)
            )
            layer._set_arrays(current._replace(**loaded))
        layer.num_features = channels
        layer.num_batches_tracked = count
    return IncompatibleKeys(missing, unexpected)
