"""Recalibration: the running statistics of batch norms recomputed from data, weights fixed.

While a recalibration runs, every batch norm it covers normalizes each batch with that
batch's own statistics (training mode: what the layers after it saw in training, and
what ``torch.optim.swa_utils.update_bn`` does) and records them in an
:class:`Accumulator`; nothing of the layer changes until every batch has gone through.
Then, with ``comm=``, the accumulators of every rank are merged (one header of ints,
then one all-gather or all-reduce of every layer's statistics at once), and the
results are written. Two methods:

``"exact"``
    the population statistics of every value the layer saw: per batch the corrected
    two-pass ``(count, mean, M2)``, merged by Chan's update (:func:`anybn.chan_merge`),
    in float64 where the library has it::

        n = n_a + n_b,  delta = mean_b - mean_a
        mean = mean_a + delta * n_b / n,  M2 = M2_a + M2_b + delta^2 * n_a * n_b / n

    then ``running_var = M2 / (n - 1)`` (``M2 / n`` for ``var_estimator="biased"``).
    The same values, however they are split into batches and in any order, up to
    rounding (for the layer's own input: a later layer's input depends on the batches
    through the earlier layers' normalization, as in training).
``"cumulative"``
    PyTorch's ``momentum=None`` rule, as ``update_bn`` runs it: the plain average over
    batches of each batch's mean and (unbiased) variance, whatever the batch sizes.

Both count only batches with at least one value per channel (``update_bn`` counts an
empty batch and so weighs the others wrong).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any

import array_api_compat as compat
import numpy as np

from .._api import batch_norm
from .._core.stats import centered_moments, masked_centered_moments
from .._xp import (
    Array,
    compute_dtype,
    is_concrete,
    normalize_axes,
    param_shape,
    reduction_axes,
    stop_gradient,
    to_host,
    values_per_channel,
)
from ..distributed.comm import Communicator, as_communicator
from .wide import wide_dtype

__all__ = [
    "METHODS",
    "Accumulator",
    "batch_moments",
    "check_method",
    "check_values_per_channel",
    "merge_over_ranks",
    "recalibrate",
    "run_batches",
]

METHODS = ("exact", "cumulative")

_MAGIC = 0x616E7263  # "anrc": a header from anybn's recalibration
_OK, _FAILED = 0, 1


def check_method(method: object) -> str:
    """``method`` must be ``"exact"`` or ``"cumulative"``."""
    if method not in METHODS:
        raise ValueError(
            "method must be 'exact' (the population statistics of every value seen) or "
            f"'cumulative' (torch.optim.swa_utils.update_bn's average of batch statistics), "
            f"got {method!r}"
        )
    return str(method)


def batch_moments(
    xp: ModuleType, x: Array, axis: int | tuple[int, ...], mask: Array | None = None
) -> tuple[Any, Array, Array]:
    """Per-channel ``(count, mean, M2)`` of one batch, param-shaped, in the wide dtype.

    The corrected two-pass algorithm on x widened to float64 (where the library has
    it); on Dask one pass over the chunks, computed now (the results are NumPy).
    ``count`` is a Python int without a mask, else an array per channel.
    """
    channels = param_shape(tuple(x.shape), axis)
    if compat.is_dask_array(x):
        import dask

        from .._kernels import dask as dask_kernel

        n, mean, m2 = dask.compute(*dask_kernel.moments(xp, x, mask, axis))
        count: Any = values_per_channel(tuple(x.shape), axis) if mask is None else n
        return _param(np, count, channels), np.reshape(mean, channels), np.reshape(m2, channels)
    wide: Any = wide_dtype(xp, x)
    xw = xp.astype(x, wide, copy=False)
    axes = reduction_axes(x.ndim, axis)
    if mask is None:
        count = values_per_channel(tuple(x.shape), axis)
        moments = centered_moments(xp, xw, axes, count) if count else None
    else:
        count = xp.sum(xp.astype(mask, wide), axis=axes, keepdims=True)
        safe = xp.where(count > 0, count, xp.ones_like(count))
        moments = masked_centered_moments(xp, xw, mask, axes, safe)
    if moments is None:  # no values: nothing to record
        zeros = xp.zeros(channels, dtype=wide, device=compat.device(x))
        return 0, zeros, zeros
    return (
        _param(xp, count, channels),
        xp.reshape(moments.mean, channels),
        xp.reshape(moments.m2, channels),
    )


def _param(xp: ModuleType, count: Any, channels: tuple[int, ...]) -> Any:
    return count if isinstance(count, int) else xp.reshape(count, channels)


def check_values_per_channel(count: Any, shape: tuple[int, ...], *, masked: bool = False) -> None:
    """Training's rule: a batch with one value per channel (or, under a mask, fewer than
    two counted values in a channel) has no variance to normalize with: ValueError."""
    smallest = count if isinstance(count, int) else float(np.min(to_host(count)))
    if smallest < 2:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {shape}"
            + (" (fewer than 2 values counted by the mask in a channel)" if masked else "")
        )


class Accumulator:
    """One batch norm's statistics over the batches it saw (see the module notes).

    The sums live in the library and on the device of the first batch's statistics, in
    the wide dtype (NumPy for Dask: its statistics are computed values). ``template``
    (the layer's running mean) gives the shape, and the library of a rank that saw no
    batch.
    """

    def __init__(self, method: str, template: Array, *, unbiased: bool = True) -> None:
        self.method = method
        self.unbiased = unbiased
        self.lock = threading.Lock()
        self.template = template
        self.shape = tuple(int(s) for s in template.shape)
        self.batches = 0
        self.count: Any = 0  # exact: values per channel (int, or an array with masks)
        # exact: the merged mean and M2; cumulative: sums of the batches' mean and variance
        self.first: Array | None = None
        self.second: Array | None = None

    def _zeros(self, like: Array) -> Array:
        if compat.is_dask_array(like):
            like = np.zeros(self.shape)
        xp = compat.array_namespace(like)
        wide: Any = wide_dtype(xp, like)
        return xp.zeros(self.shape, dtype=wide, device=compat.device(like))

    def add(self, count: Any, mean: Array, m2: Array) -> None:
        """Merge one batch's ``(count, mean, M2)`` (a batch with no value is skipped)."""
        if isinstance(count, int) and count == 0:
            return
        with self.lock:
            if self.first is None:
                self.first = self.second = self._zeros(mean)
            assert self.second is not None
            xp = compat.array_namespace(self.first)
            wide = self.first.dtype

            def here(a: Array) -> Array:  # (Dask's statistics are NumPy values)
                return xp.astype(a if compat.array_namespace(a) is xp else xp.asarray(a), wide)

            mean, m2 = here(mean), here(m2)
            if not isinstance(count, int):
                count = here(count)
            self.batches += 1
            if self.method == "exact":
                total = self.count + count
                delta = mean - self.first
                self.first = self.first + delta * (count / total)
                self.second = self.second + m2 + delta * delta * (self.count * count / total)
                self.count = total
            else:
                self.first = self.first + mean
                self.second = self.second + m2 / (count - 1 if self.unbiased else count)

    # --- across ranks ---

    def flat(self) -> Array:
        """This accumulator as one 1-D array (what travels between ranks)."""
        first = self._zeros(self.template) if self.first is None else self.first
        second = first if self.second is None else self.second
        xp = compat.array_namespace(first)
        full = functools.partial(xp.full, dtype=first.dtype, device=compat.device(first))
        parts = [full((1,), float(self.batches))]
        if self.method == "exact":
            count = self.count
            parts.append(full(self.shape, float(count)) if isinstance(count, int) else count)
        return xp.concat([xp.reshape(p, (-1,)) for p in (*parts, first, second)])

    def size(self) -> int:
        return 1 + (3 if self.method == "exact" else 2) * math.prod(self.shape)

    def take(self, rows: Array) -> None:
        """Replace the statistics by the merge over ranks of ``rows`` (ranks, size) from
        :meth:`flat` (all-gathered, exact), or by their sum (all-reduced, cumulative: 1-D)."""
        xp = compat.array_namespace(rows)
        c = math.prod(self.shape)

        def part(row: Array, i: int) -> Array:
            return xp.reshape(row[1 + i * c : 1 + (i + 1) * c], self.shape)

        if self.method == "cumulative":
            self.batches = round(float(rows[0]))
            self.first, self.second = part(rows, 0), part(rows, 1)
            return
        merged = Accumulator("exact", self.template, unbiased=self.unbiased)
        batches = 0
        for r in range(int(rows.shape[0])):  # in rank order, every rank the same
            row = rows[r, :]
            rank_batches = round(float(row[0]))
            if rank_batches == 0:
                continue
            merged.add(part(row, 0), part(row, 1), part(row, 2))
            batches += rank_batches
        self.count, self.first, self.second = merged.count, merged.first, merged.second
        self.batches = batches

    # --- the result ---

    def result(self) -> tuple[Array, Array] | None:
        """``(running_mean, running_var)`` in the wide dtype, or None if no batch was seen."""
        if self.batches == 0 or self.first is None or self.second is None:
            return None
        if self.method == "cumulative":
            return self.first / self.batches, self.second / self.batches
        count = self.count
        return self.first, self.second / (count - 1 if self.unbiased else count)


def merge_over_ranks(
    comm: object, accumulators: Sequence[Accumulator], error: BaseException | None
) -> None:
    """Merge every rank's accumulators in place: a header of ints, then one collective.

    Every rank must call it with the same layers (same number, shapes and method); a
    rank whose batches raised (``error``) makes every rank raise, its own error there,
    RuntimeError elsewhere, before any statistics travel.
    """
    communicator: Communicator = as_communicator(comm)
    method = accumulators[0].method if accumulators else "exact"
    size = sum(a.size() for a in accumulators)
    template = accumulators[0].flat() if accumulators else None
    header = [_MAGIC, _OK if error is None else _FAILED, len(accumulators), size,
              METHODS.index(method)]  # fmt: skip
    try:
        rows = communicator.all_gather_ints(header, like=template)
    except Exception as failure:  # the ranks could not be told
        if error is not None:
            raise error from failure
        raise
    where = f"anybn recalibration ({communicator.engine}, {len(rows)} ranks)"
    if any(r[0] != _MAGIC for r in rows):
        raise RuntimeError(f"{where}: the ranks are not all in a recalibration")
    for column, what in ((2, "number of batch norms"), (3, "statistics size"), (4, "method")):
        values = [r[column] for r in rows]
        if len(set(values)) > 1:
            if column == 4:
                shown = ", ".join(f"rank {i}: {METHODS[v]}" for i, v in enumerate(values))
            else:
                shown = ", ".join(f"rank {i}: {v}" for i, v in enumerate(values))
            raise ValueError(f"{where}: every rank must recalibrate the same model, "
                             f"got a different {what} ({shown})")  # fmt: skip
    failed = [i for i, r in enumerate(rows) if r[1] != _OK]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(
            f"{where}: rank(s) {failed} raised while running their batches (see the error "
            "on those ranks); no statistics were changed"
        )
    if not accumulators:
        return
    flats = [a.flat() for a in accumulators]
    xp = compat.array_namespace(flats[0])
    flat = xp.concat(flats)
    gathered = (
        communicator.all_gather(flat) if method == "exact" else communicator.all_reduce(flat)
    )
    start = 0
    for a in accumulators:
        stop = start + a.size()
        a.take(gathered[:, start:stop] if method == "exact" else gathered[start:stop])
        start = stop


def run_batches(
    batches: Iterable[Any],
    step: Callable[[Any], object],
    accumulators: Sequence[Accumulator],
    comm: object,
) -> None:
    """Call ``step`` on every batch, then (with ``comm``) merge over ranks.

    With ``comm`` an exception from a batch is held until the ranks have been told, so
    that the other ranks raise instead of waiting in the collective.
    """
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"batches must be an iterable of batches (a list, a DataLoader, a generator), "
            f"got {type(batches).__name__}"
        )
    error: BaseException | None = None
    try:
        for batch in batches:
            step(batch)
    except Exception as exc:
        if comm is None:
            raise
        error = exc
    if comm is not None:
        merge_over_ranks(comm, accumulators, error)


# --- the anybn.BatchNorm layers ---------------------------------------------------------


class _Recorder:
    """What a layer's forward does while :func:`recalibrate` runs: normalize with the
    batch's statistics, and record them."""

    def __init__(self, accumulators: dict[int, Accumulator]) -> None:
        self.accumulators = accumulators
        #: where each layer's inputs live (a layer not yet bound to a library binds there)
        self.storage: dict[int, Any] = {}

    def forward(self, layer: Any, x: Array, mask: Array | None) -> Array:
        if compat.is_jax_array(x) and not is_concrete(x):
            raise RuntimeError(
                "anybn.recalibrate records each batch's statistics and cannot keep JAX "
                "tracers: call the model eagerly (outside jax.jit, jax.vmap, ...) while it runs"
            )
        with layer._lock:
            storage = layer._placement_for(x)  # the layer's own checks of x
            xp = storage.xp
            axes = normalize_axes(layer.axis, x.ndim)
            axis: int | tuple[int, ...] = axes[0] if len(axes) == 1 else axes
            channels: Any = param_shape(tuple(x.shape), axes)
            channels = channels[0] if len(axes) == 1 else channels
            if channels != layer.num_features:
                raise ValueError(
                    f"x has {channels} channels on axis {layer.axis} (shape {tuple(x.shape)}) "
                    f"but this BatchNorm has num_features={layer.num_features}"
                )
            arrays = layer._arrays_in(storage, channels)
            self.storage[id(layer)] = storage
        if mask is not None:
            from .._checks import check_mask

            mask = check_mask(xp, xp.asarray(mask) if compat.is_dask_array(x) else mask, x, axes)
        if math.prod(x.shape) == 0:  # an empty batch: an empty output, nothing recorded
            return batch_norm(x, arrays.running_mean, arrays.running_var, arrays.weight,
                              arrays.bias, eps=layer.eps, axis=axis, xp=xp).y  # fmt: skip
        count, mean, m2 = batch_moments(xp, stop_gradient(x), axis, mask)
        if isinstance(count, int) or is_concrete(count):
            check_values_per_channel(count, tuple(x.shape), masked=mask is not None)
        self.accumulators[id(layer)].add(count, mean, m2)
        # y as in training: normalized with this batch's (biased) statistics
        cdt: Any = compute_dtype(xp, x.dtype)
        var = m2 / count
        if compat.is_dask_array(x):  # (the statistics are computed NumPy values)
            mean, var = xp.asarray(mean), xp.asarray(var)
        return batch_norm(
            x, xp.astype(mean, cdt), xp.astype(var, cdt), arrays.weight, arrays.bias,
            training=False, eps=layer.eps, axis=axis, xp=xp,
        ).y  # fmt: skip


def _check_layers(layers: object) -> list[Any]:
    from .._layer import BatchNorm

    if isinstance(layers, BatchNorm):
        layers = [layers]
    if not isinstance(layers, Iterable):
        raise TypeError(
            f"layers must be an anybn.BatchNorm or a list of them, got {type(layers).__name__}"
        )
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty: name the anybn.BatchNorm layers to recalibrate")
    for i, layer in enumerate(layers):
        if not isinstance(layer, BatchNorm):
            raise TypeError(f"layers[{i}] must be an anybn.BatchNorm, got {type(layer).__name__}")
        if not layer.track_running_stats:
            raise ValueError(
                f"layers[{i}] has no running statistics (track_running_stats=False): it "
                "normalizes with each batch's own statistics, so there is nothing to "
                "recalibrate; leave it out of layers"
            )
        if layer.frozen:
            raise ValueError(
                f"layers[{i}] is frozen: its running statistics are fixed; call "
                "layer.freeze(False) first to recalibrate it"
            )
        if layer.num_features is None:
            raise ValueError(
                f"layers[{i}] has num_features=None: it has not seen an input yet, so its "
                "number of channels is unknown; create it with num_features"
            )
        if layer._recorder is not None:
            raise RuntimeError(f"layers[{i}] is already being recalibrated")
    if len({id(layer) for layer in layers}) != len(layers):
        raise ValueError("layers names a layer more than once")
    return layers


def recalibrate(
    model: Callable[[Any], object],
    batches: Iterable[Any],
    /,
    *,
    layers: Any,
    method: str = "exact",
    comm: object = None,
) -> None:
    r"""Recompute the running statistics of :class:`anybn.BatchNorm` layers from data.

    Calls ``model(batch)`` on every batch of ``batches``. Meanwhile each layer of
    ``layers`` normalizes with the batch's own statistics (as in training, whatever
    its mode) and records them; its parameters, buffers and mode are left as they
    are until every batch has gone through, and then its ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` (the number of batches it saw) are
    replaced by one of:

    ``method="exact"`` (the default)
        the population statistics of every value the layer saw::

            running_mean = mean over every value seen
            running_var  = M2 / (n - 1)      (M2 / n for var_estimator="biased")

        Computed per batch by the corrected two-pass algorithm and merged by Chan's
        update (:func:`anybn.chan_merge`), in float64 where the library has it: the
        same result for any split of the same values into batches and any order, up to
        rounding.
    ``method="cumulative"``
        the average over batches of each batch's mean and variance: PyTorch's
        ``momentum=None`` rule, as ``torch.optim.swa_utils.update_bn`` runs it.

    Parameters
    ----------
    model : callable
        Called as ``model(batch)`` for each batch; it calls the layers (its return
        value is not used).
    batches : iterable
        The batches, each passed to ``model`` as it is. Batches with no values are
        skipped.
    layers : anybn.BatchNorm or list of anybn.BatchNorm
        The layers to recalibrate. Each needs running statistics, a known
        ``num_features``, and must not be frozen.
    method : {"exact", "cumulative"}, optional
        See above.
    comm : optional
        Merge the statistics of every rank of a group (a ``torch.distributed``
        ProcessGroup, an mpi4py communicator, ``"torch"``, ``"mpi"`` or an
        :class:`anybn.distributed.Communicator`): every rank calls ``recalibrate``
        with the same layers and its own batches (any number, none included), and
        every rank ends with the statistics that one process would have computed from
        every rank's batches, each count-weighted. The ranks exchange one header of
        ints and one array with every layer's statistics, after the last batch.
        None: this process's batches only.

    Raises
    ------
    TypeError
        ``layers`` that are not :class:`anybn.BatchNorm` layers, ``batches`` not
        iterable, an input of another library than the layer's.
    ValueError
        A layer without running statistics, frozen, without ``num_features``, named
        twice; a bad ``method``; an input the layer rejects (wrong channels); a batch
        with one value per channel (as in training). With ``comm``, different layers on
        different ranks. Whatever raises, every layer is left as it was (with ``comm``
        on every rank: a rank that raises makes the others raise).

    Examples
    --------
    >>> import numpy as np
    >>> import anybn
    >>> bn = anybn.BatchNorm(2, xp=np).eval()
    >>> rng = np.random.default_rng(0)
    >>> data = rng.normal(5.0, 2.0, size=(1000, 2))
    >>> anybn.recalibrate(bn, np.array_split(data, 7), layers=bn)
    >>> bool(np.allclose(bn.running_mean, data.mean(0)))
    True
    >>> bool(np.allclose(bn.running_var, data.var(0, ddof=1)))
    True
    >>> bn.num_batches_tracked, bn.training
    (7, False)
    """
    method = check_method(method)
    layers = _check_layers(layers)
    if not callable(model):
        raise TypeError(f"model must be callable (model(batch)), got {type(model).__name__}")
    if comm is not None:
        as_communicator(comm)  # a bad comm raises before any batch
    accumulators = {
        id(layer): Accumulator(
            method, _template(layer), unbiased=layer.var_estimator == "unbiased"
        )
        for layer in layers
    }
    recorder = _Recorder(accumulators)
    for layer in layers:
        layer._recorder = recorder
    try:
        run_batches(batches, model, list(accumulators.values()), comm)
    finally:
        for layer in layers:
            layer._recorder = None
    for layer in layers:
        result = accumulators[id(layer)].result()
        if result is None:
            continue
        storage = recorder.storage.get(id(layer))
        with layer._lock:
            if layer._storage is None and storage is not None:  # bound, as by a forward
                layer._set_arrays(layer._arrays_in(storage, layer.num_features))
                layer._storage = storage
        mean, var = result
        layer.load_state_dict(
            {"running_mean": mean, "running_var": var,
             "num_batches_tracked": accumulators[id(layer)].batches},
            strict=False,
        )  # fmt: skip


def _template(layer: Any) -> Array:
    """An array of the layer's per-channel shape, library and device."""
    a = layer.running_mean
    assert a is not None
    return a
