"""Recalibration: ``anybn.recalibrate`` (the layer, on every backend) and
``anybn.torch.recalibrate`` (models).

Anchors: the float64 population statistics of the values each batch norm saw (exact
method), ``torch.optim.swa_utils.update_bn`` on the same batches (cumulative method),
and one process that saw every rank's batches (``comm=``, ranks as threads here; real
gloo and MPI ranks in test_recalibrate_distributed.py).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from _helpers import host
from test_distributed_local import ThreadGroup

import anybn
from anybn._testing.backends import get_backend

#: Uneven batch sizes, one of them a single sample (4 values per channel).
SPLITS = [17, 1, 40, 9, 33]


def _data(rng: np.random.Generator, n: int = sum(SPLITS)) -> np.ndarray:
    """(n, 3, 4), offset by 50 so that the mean matters (float32 holds it to 4e-6)."""
    return 50.0 + rng.normal(size=(n, 3, 4)) * np.array([0.5, 1.0, 2.0]).reshape(1, 3, 1)


def _batches(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(x, np.cumsum(sizes)[:-1])


def _layer(**options: Any) -> anybn.BatchNorm:
    bn = anybn.BatchNorm(3, **options)
    bn.load_state_dict({"weight": np.array([1.5, 0.5, 2.0]), "bias": np.array([0.1, -1.0, 3.0]),
                        "running_mean": np.zeros(3), "running_var": np.ones(3),
                        "num_batches_tracked": 99})  # fmt: skip
    return bn


def _state(bn: anybn.BatchNorm) -> dict[str, np.ndarray]:
    return {k: host(v) for k, v in bn.state_dict().items()}


def _assert_same_state(bn: anybn.BatchNorm, before: dict[str, np.ndarray]) -> None:
    for k, v in _state(bn).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


TOL = {"float64": 1e-12, "float32": 3e-7, "float16": 2e-3, "bfloat16": 1e-2}


@pytest.mark.parametrize("method", ["exact", "cumulative"])
def test_layer_on_every_backend(backend: Any, dtype: str, method: str,
                                rng: np.random.Generator) -> None:  # fmt: skip
    """One layer, uneven batches: the exact population statistics (or the average of the
    batches' statistics) of the values as given in the backend's dtype; counter, mode,
    weight and bias as expected; the layer trains normally afterwards."""
    x = _data(rng)
    batches = [backend.asarray(b, dtype) for b in _batches(x, SPLITS)]
    seen = [host(b).astype(np.float64) for b in batches]
    bn = _layer(dtype="float32" if dtype in ("float16", "bfloat16") else dtype).eval()
    before = _state(bn)
    anybn.recalibrate(lambda b: bn(b), batches, layers=bn, method=method)
    if method == "exact":
        values = np.concatenate(seen)
        want_mean, want_var = values.mean((0, 2)), values.var((0, 2), ddof=1)
    else:
        want_mean = np.mean([b.mean((0, 2)) for b in seen], axis=0)
        want_var = np.mean([b.var((0, 2), ddof=1) for b in seen], axis=0)
    state = _state(bn)
    tol = TOL[dtype]
    np.testing.assert_allclose(state["running_mean"], want_mean, rtol=tol)
    np.testing.assert_allclose(state["running_var"], want_var, rtol=max(tol, 1e-11) * 10)
    assert int(state["num_batches_tracked"]) == len(SPLITS) and bn.training is False
    for k in ("weight", "bias"):
        np.testing.assert_array_equal(state[k], before[k])
    bn.train()(batches[0])  # the recorder is gone: an ordinary training step
    assert bn.num_batches_tracked == len(SPLITS) + 1


def test_exact_is_independent_of_batching(rng: np.random.Generator) -> None:
    """The same values in other batches, in another order: the same statistics to rounding."""
    x = _data(rng)
    first = _layer()
    anybn.recalibrate(first, _batches(x, SPLITS), layers=first)
    second = _layer()
    shuffled = x[rng.permutation(len(x))]
    anybn.recalibrate(second, _batches(shuffled, [50, 50]), layers=second)
    np.testing.assert_allclose(second.running_mean, first.running_mean, rtol=1e-14)
    np.testing.assert_allclose(second.running_var, first.running_var, rtol=1e-13)
    assert second.num_batches_tracked == 2


def test_cumulative_equals_update_bn() -> None:
    """anybn.BatchNorm on torch tensors against torch.optim.swa_utils.update_bn on a
    torch.nn.BatchNorm1d with the same batches (float64)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    batches = [torch.from_numpy(b) for b in _batches(_data(rng), SPLITS)]
    reference = torch.nn.BatchNorm1d(3).double()
    torch.optim.swa_utils.update_bn(batches, reference)
    bn = _layer(dtype="float64")
    anybn.recalibrate(bn, batches, layers=[bn], method="cumulative")
    torch.testing.assert_close(bn.running_mean, reference.running_mean, rtol=1e-13, atol=0)
    torch.testing.assert_close(bn.running_var, reference.running_var, rtol=1e-13, atol=0)
    assert bn.num_batches_tracked == int(reference.num_batches_tracked)


def test_biased_estimator_and_mask(rng: np.random.Generator) -> None:
    """var_estimator="biased" stores M2 / n; with a mask only the values it counts."""
    x = _data(rng)
    masks = [rng.random((len(b), 1, 4)) < 0.7 for b in _batches(x, SPLITS)]
    masks[1][:] = True  # the one-sample batch: every value counted
    bn = _layer(var_estimator="biased")
    batches = list(zip(_batches(x, SPLITS), masks, strict=True))
    anybn.recalibrate(lambda pair: bn(pair[0], mask=pair[1]), batches, layers=bn)
    values = np.concatenate([np.moveaxis(b, 1, -1)[np.broadcast_to(m, b.shape).transpose(0, 2, 1)]
                             .reshape(-1, 3) for b, m in batches])  # fmt: skip
    np.testing.assert_allclose(bn.running_mean, values.mean(0), rtol=1e-13)
    np.testing.assert_allclose(bn.running_var, values.var(0), rtol=1e-12)


def test_two_layers_see_what_training_would_give_them(rng: np.random.Generator) -> None:
    """A model of two layers: the second layer's statistics are those of its inputs with the
    first normalizing each batch by the batch's own statistics, as in training."""
    first, second = _layer(), _layer()

    def model(x: np.ndarray) -> np.ndarray:
        return second(np.maximum(first(x), 0.0) * 3.0)

    batches = _batches(_data(rng), SPLITS)
    anybn.recalibrate(model, batches, layers=[first, second])
    w, b = np.array([1.5, 0.5, 2.0]), np.array([0.1, -1.0, 3.0])
    inputs = []
    for x in batches:
        mean, var = x.mean((0, 2), keepdims=True), x.var((0, 2), keepdims=True)
        y = (x - mean) / np.sqrt(var + 1e-5) * w.reshape(1, 3, 1) + b.reshape(1, 3, 1)
        inputs.append(np.maximum(y, 0.0) * 3.0)
    values = np.concatenate(inputs)
    np.testing.assert_allclose(second.running_mean, values.mean((0, 2)), rtol=1e-12)
    np.testing.assert_allclose(second.running_var, values.var((0, 2), ddof=1), rtol=1e-11)


def test_empty_batches_are_not_counted(rng: np.random.Generator) -> None:
    x = _data(rng)
    bn = _layer()
    anybn.recalibrate(bn, [x[:0], *_batches(x, SPLITS), x[:0]], layers=bn, method="cumulative")
    assert bn.num_batches_tracked == len(SPLITS)
    want = np.mean([b.mean((0, 2)) for b in _batches(x, SPLITS)], axis=0)
    np.testing.assert_allclose(bn.running_mean, want, rtol=1e-14)


# --- errors: a clear message, every layer as it was ------------------------------------------


def _bad_calls() -> list[Any]:
    ok = _layer()
    data = [np.ones((4, 3)) + np.arange(4).reshape(4, 1)]
    return [
        ("not a layer", lambda: anybn.recalibrate(ok, data, layers=[ok, "bn"]),
         TypeError, r"layers\[1\] must be an anybn.BatchNorm"),
        ("empty", lambda: anybn.recalibrate(ok, data, layers=[]), ValueError, "layers is empty"),
        ("twice", lambda: anybn.recalibrate(ok, data, layers=[ok, ok]), ValueError,
         "more than once"),
        ("no stats", lambda: anybn.recalibrate(ok, data, layers=anybn.BatchNorm(
            3, track_running_stats=False)), ValueError, "no running statistics"),
        ("frozen", lambda: anybn.recalibrate(ok, data, layers=_layer(frozen=True)), ValueError,
         r"frozen.*freeze\(False\)"),
        ("lazy", lambda: anybn.recalibrate(ok, data, layers=anybn.BatchNorm()), ValueError,
         "num_features=None"),
        ("method", lambda: anybn.recalibrate(ok, data, layers=ok, method="ema"), ValueError,
         "method must be 'exact'"),
        ("batches", lambda: anybn.recalibrate(ok, 3, layers=ok), TypeError,
         "batches must be an iterable"),
        ("model", lambda: anybn.recalibrate(None, data, layers=ok), TypeError,
         "model must be callable"),
        ("comm", lambda: anybn.recalibrate(ok, data, layers=ok, comm=42), TypeError,
         "comm must be"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_bad_arguments(case: int) -> None:
    _, call, kind, words = _bad_calls()[case]
    with pytest.raises(kind, match=words):
        call()


@pytest.mark.parametrize(
    ("batches", "kind", "words"),
    [
        ([np.ones((5, 3)), np.ones((1, 3))], ValueError, "more than 1 value per channel"),
        ([np.ones((5, 3)), np.ones((5, 4))], ValueError, "x has 4 channels"),
        ([np.ones((5, 3)), np.ones(3)], ValueError, "at least 2 dimensions"),
        ([np.ones((5, 3)), "batch"], TypeError, "x must be an array"),
    ],
    ids=["one-value", "channels", "ndim", "not-an-array"],
)
def test_a_bad_batch_leaves_the_layers(batches: list, kind: type, words: str) -> None:
    first, second = _layer(), _layer()
    before = (_state(first), _state(second))
    with pytest.raises(kind, match=words):
        anybn.recalibrate(lambda b: second(first(b)), [*batches, np.ones((5, 3))],
                          layers=[first, second])  # fmt: skip
    _assert_same_state(first, before[0])
    _assert_same_state(second, before[1])
    assert first._recorder is None and second._recorder is None
    first(np.arange(6.0).reshape(2, 3))  # trains as before
    assert first.num_batches_tracked == 100


def test_an_error_in_the_model_leaves_the_layers() -> None:
    bn = _layer()
    before = _state(bn)

    def model(x: np.ndarray) -> None:
        bn(x)
        raise KeyError("the model's own error")

    with pytest.raises(KeyError, match="own error"):
        anybn.recalibrate(model, [np.ones((4, 3))], layers=bn)
    _assert_same_state(bn, before)


def test_layer_of_another_library_raises() -> None:
    torch = pytest.importorskip("torch")
    bn = _layer()
    bn(np.ones((4, 3)) + np.arange(4).reshape(4, 1))  # bound to NumPy
    before = _state(bn)
    with pytest.raises(TypeError, match=r"holds .*numpy arrays"):
        anybn.recalibrate(bn, [torch.ones(4, 3)], layers=bn)
    _assert_same_state(bn, before)


# --- comm=: ranks as threads ------------------------------------------------------------------

#: batches per rank (every rank's batch sizes), a rank with none among them
RANK_SPLITS = {2: [[17, 1], [40, 9, 33]], 3: [[17, 1, 40], [], [9, 33]]}


@pytest.mark.parametrize("method", ["exact", "cumulative"])
@pytest.mark.parametrize("size", sorted(RANK_SPLITS))
def test_ranks_equal_one_process(size: int, method: str, rng: np.random.Generator) -> None:
    x = _data(rng)
    batches = _batches(x, SPLITS)
    one = _layer()
    anybn.recalibrate(one, batches, layers=one, method=method)
    per_rank, start = [], 0
    for sizes in RANK_SPLITS[size]:
        per_rank.append(batches[start : start + len(sizes)])
        start += len(sizes)

    def rank(comm: Any) -> anybn.BatchNorm:
        bn = _layer()
        anybn.recalibrate(bn, per_rank[comm.rank], layers=bn, method=method, comm=comm)
        return bn

    results = ThreadGroup(size).run(rank)
    for status, bn in results:
        assert status == "ok", bn
        np.testing.assert_allclose(bn.running_mean, one.running_mean, rtol=1e-14)
        np.testing.assert_allclose(bn.running_var, one.running_var, rtol=1e-13)
        assert bn.num_batches_tracked == len(SPLITS)


def test_ranks_a_failing_rank_fails_every_rank(rng: np.random.Generator) -> None:
    """One rank's bad batch: every rank raises (its own error there), no rank changes."""
    batches = _batches(_data(rng), SPLITS)
    layers = [_layer() for _ in range(3)]

    def rank(comm: Any) -> None:
        mine = [np.ones((1, 3))] if comm.rank == 1 else batches[comm.rank : comm.rank + 2]
        anybn.recalibrate(layers[comm.rank], mine, layers=layers[comm.rank], comm=comm)

    results = ThreadGroup(3).run(rank)
    assert results[1][0] == "raised" and "more than 1 value" in str(results[1][1])
    for r in (0, 2):
        assert results[r][0] == "raised" and isinstance(results[r][1], RuntimeError)
        assert "rank(s) [1] raised" in str(results[r][1])
    for bn in layers:
        assert bn.num_batches_tracked == 99
        np.testing.assert_array_equal(bn.running_mean, np.zeros(3))


def test_ranks_with_different_layers_raise(rng: np.random.Generator) -> None:
    def rank(comm: Any) -> None:
        layers = [_layer() for _ in range(1 + comm.rank)]
        anybn.recalibrate(lambda b: None, [], layers=layers, comm=comm)

    for status, error in ThreadGroup(2).run(rank):
        assert status == "raised" and "number of batch norms (rank 0: 1, rank 1: 2)" in str(error)


# --- anybn.torch.recalibrate -----------------------------------------------------------------


@pytest.fixture
def torch() -> Any:
    return pytest.importorskip("torch")


def _model(torch: Any, drop_ins: bool = False) -> Any:
    nn = torch.nn
    import anybn.torch as abt

    bn2, bn1 = (abt.BatchNorm2d, abt.BatchNorm1d) if drop_ins else (nn.BatchNorm2d, nn.BatchNorm1d)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), bn2(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3), bn2(4, momentum=None), nn.ReLU(), nn.Dropout(0.0),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 5), bn1(5, momentum=0.5),
    ).double()  # fmt: skip
    return model.eval()


def _image_batches(torch: Any, sizes: list[int], seed: int = 0) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64) * 2 + 3 for n in sizes]


def _buffers(model: Any) -> dict[str, Any]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("drop_ins", [False, True], ids=["nn", "anybn"])
def test_torch_cumulative_equals_update_bn(torch: Any, drop_ins: bool) -> None:
    model = _model(torch, drop_ins)
    batches = _image_batches(torch, [5, 9, 3, 7])
    reference = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, reference)
    anybn.torch.recalibrate(model, [(b, "label") for b in batches], method="cumulative")
    for (k, got), want in zip(model.state_dict().items(), reference.state_dict().values(),
                              strict=True):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13, msg=k)
    assert not model.training and [m.momentum for m in model if hasattr(m, "momentum")] == [
        0.1, None, 0.5]  # fmt: skip


def _inputs_seen(torch: Any, model: Any, batches: list[Any]) -> dict[str, Any]:
    """Every batch norm's inputs, in a training-mode forward of a copy (torch's own)."""
    copied = copy.deepcopy(model).train()
    seen: dict[str, list[Any]] = {}
    for name, m in copied.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(
                name, []).append(args[0].detach().clone()))  # fmt: skip
    with torch.no_grad():
        for b in batches:
            copied(b)
    return {k: torch.cat(v) for k, v in seen.items()}


def test_torch_exact_population_statistics(torch: Any) -> None:
    model = _model(torch)
    batches = _image_batches(torch, [5, 9, 3, 7, 2])
    seen = _inputs_seen(torch, model, batches)
    anybn.torch.recalibrate(model, batches)
    for name, values in seen.items():
        dims = [d for d in range(values.dim()) if d != 1]
        bn = model.get_submodule(name)
        torch.testing.assert_close(bn.running_mean, values.mean(dims), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(bn.running_var, values.var(dims), rtol=1e-11, atol=1e-13)
        assert int(bn.num_batches_tracked) == len(batches)


def test_torch_float32_model_and_modes(torch: Any) -> None:
    """A float32 model: float64 accumulation, statistics to float32 rounding; every module's own
    train/eval flag back afterwards; no gradient recorded; no forward left on the modules."""
    model = _model(torch).float()
    model[1].train()  # a submodule in training mode inside an eval model
    modes = [m.training for m in model.modules()]
    batches = [b.float().requires_grad_() for b in _image_batches(torch, [8, 8, 16])]
    seen = _inputs_seen(torch, model.double(), [b.double() for b in batches])
    model.float()
    anybn.torch.recalibrate(model, batches)
    assert [m.training for m in model.modules()] == modes and modes[2]
    assert all("forward" not in m.__dict__ for m in model.modules())
    values = seen["1"]
    torch.testing.assert_close(model[1].running_mean, values.mean((0, 2, 3)).float(),
                               rtol=3e-7, atol=1e-6)  # fmt: skip
    assert model[1].running_mean.grad_fn is None and not model[1].running_mean.requires_grad


def test_torch_exact_independent_of_batching(torch: Any) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).double()
    data = torch.cat(_image_batches(torch, [30]))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    anybn.torch.recalibrate(a, data.split([7, 13, 10]))
    anybn.torch.recalibrate(b, data[torch.randperm(30)].split(15))
    torch.testing.assert_close(a[1].running_mean, b[1].running_mean, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(a[1].running_var, b[1].running_var, rtol=1e-13, atol=1e-14)


def test_torch_empty_batch_not_counted(torch: Any) -> None:
    """update_bn counts an empty batch and weighs the next ones wrong; anybn skips it."""
    nn = torch.nn
    batches = [torch.zeros(0, 3, dtype=torch.float64), *[b.mean((2, 3)) for b in
               _image_batches(torch, [4, 6])]]  # fmt: skip
    ours = nn.BatchNorm1d(3).double()
    anybn.torch.recalibrate(ours, batches, method="cumulative")
    want = (batches[1].mean(0) + batches[2].mean(0)) / 2
    torch.testing.assert_close(ours.running_mean, want, rtol=1e-14, atol=1e-14)
    assert int(ours.num_batches_tracked) == 2
    theirs = nn.BatchNorm1d(3).double()
    torch.optim.swa_utils.update_bn(batches, theirs)
    assert not torch.allclose(theirs.running_mean, want)


def test_torch_unseen_batch_norm_warns_and_keeps_its_statistics(torch: Any) -> None:
    nn = torch.nn

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.BatchNorm1d(2), nn.BatchNorm1d(2)

        def forward(self, x: Any) -> Any:
            return self.used(x)

    model = Branchy().double()
    with torch.no_grad():
        model.unused.running_mean.fill_(7.0)
    with pytest.warns(UserWarning, match="1 batch norm.*saw no batch.*unused"):
        anybn.torch.recalibrate(model, [torch.randn(4, 2, dtype=torch.float64)])
    assert torch.equal(model.unused.running_mean, torch.full((2,), 7.0, dtype=torch.float64))


def test_torch_forward_and_device_and_wrappers(torch: Any) -> None:
    """Dict batches through forward=; device=; DataParallel unwrapped; nn.SyncBatchNorm, which
    refuses CPU input in training, recalibrates (locally, without comm)."""
    nn = torch.nn
    model = nn.Sequential(nn.Linear(3, 2), nn.SyncBatchNorm(2)).double()
    data = [{"x": torch.randn(6, 3, dtype=torch.float64)} for _ in range(3)]
    anybn.torch.recalibrate(nn.DataParallel(model), data, forward=lambda m, b: m(b["x"]))
    with torch.no_grad():
        z = model[0](torch.cat([d["x"] for d in data]))
    torch.testing.assert_close(model[1].running_mean, z.mean(0), rtol=1e-12, atol=1e-13)
    anybn.torch.recalibrate(model, [d["x"] for d in data], device="cpu")
    torch.testing.assert_close(model[1].running_var, z.var(0), rtol=1e-12, atol=1e-13)


def test_torch_errors_leave_the_model(torch: Any) -> None:
    nn = torch.nn
    model = _model(torch)
    before = _buffers(model)
    modes = [m.training for m in model.modules()]

    def check() -> None:
        for k, v in _buffers(model).items():
            assert torch.equal(v, before[k]), k
        assert [m.training for m in model.modules()] == modes
        assert all("forward" not in m.__dict__ for m in model.modules())
        assert model[4].momentum is None and model[9].momentum == 0.5

    good = _image_batches(torch, [4, 4])
    for batches, kind, words in (
        ([*good, torch.randn(2, 4, 6, 6, dtype=torch.float64)], RuntimeError, "channels"),
        ([*good, torch.randn(1, 3, 6, 6, dtype=torch.float64)], ValueError,
         "more than 1 value per channel"),
        ([*good, "batch"], TypeError, "conv2d"),
    ):  # fmt: skip
        with pytest.raises(kind, match=words):
            anybn.torch.recalibrate(model, batches)
        check()
    with pytest.raises(ValueError, match="method must be"):
        anybn.torch.recalibrate(model, good, method="ema")
    with pytest.raises(TypeError, match="batches must be an iterable"):
        anybn.torch.recalibrate(model, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no batch norm with running statistics"):
        anybn.torch.recalibrate(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(
            2, track_running_stats=False)), good)  # fmt: skip
    with pytest.raises(ValueError, match=r"lazy batch norms that have not seen an input yet \(1\)"):
        anybn.torch.recalibrate(nn.Sequential(nn.Linear(2, 2), nn.LazyBatchNorm1d()), good)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        anybn.torch.recalibrate(lambda x: x, good)  # type: ignore[arg-type]
    check()


@pytest.mark.parametrize("method", ["exact", "cumulative"])
def test_torch_ranks_equal_one_process(torch: Any, method: str) -> None:
    batches = _image_batches(torch, [5, 9, 3, 7, 2])
    one = _model(torch)
    models = [copy.deepcopy(one) for _ in range(3)]  # (built here: threads share torch's RNG)
    anybn.torch.recalibrate(one, batches, method=method)
    per_rank = [batches[:1], [], batches[1:]]

    def rank(comm: Any) -> Any:
        model = models[comm.rank]
        anybn.torch.recalibrate(model, per_rank[comm.rank], method=method, comm=comm)
        return model

    for status, model in ThreadGroup(3).run(rank):
        assert status == "ok", model
        for k, v in one.state_dict().items():
            torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-12, atol=1e-13, msg=k)


def test_dask_layer_statistics_in_one_pass_per_batch() -> None:
    """A Dask batch: every chunk is produced once for the statistics (the output stays lazy)."""
    da = pytest.importorskip("dask.array")
    import dask

    calls = []
    rng = np.random.default_rng(3)
    values = rng.normal(size=(64, 3, 8)) * 2 + 10

    def chunk(block_id: Any = None) -> np.ndarray:
        calls.append(block_id)
        i = block_id[0]
        return values[i * 8 : (i + 1) * 8]

    x = da.map_blocks(chunk, chunks=((8,) * 8, (3,), (8,)), dtype=np.float64,
                      meta=np.empty((0, 0, 0)))  # fmt: skip
    bn = _layer()
    with dask.config.set(scheduler="synchronous"):
        anybn.recalibrate(bn, [x], layers=bn)
    assert len(calls) == 8
    np.testing.assert_allclose(bn.running_mean, values.mean((0, 2)), rtol=1e-13)
    np.testing.assert_allclose(bn.running_var, values.var((0, 2), ddof=1), rtol=1e-12)


@pytest.mark.parametrize("backend", [pytest.param(get_backend("torch"), id="torch")], indirect=True)
def test_layer_on_torch_tensors_records_no_graph(backend: Any) -> None:
    torch = backend.lib
    bn = _layer(dtype="float64")
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    anybn.recalibrate(lambda b: bn(b), [x], layers=bn)
    assert not bn.running_mean.requires_grad and bn.running_mean.grad_fn is None


@pytest.mark.slow
def test_dask_larger_than_memory_in_one_pass() -> None:
    """1 GiB of float32 under a 256 MiB address-space cap: every chunk generated once, the
    statistics those of every value (float64 reference computed chunk by chunk)."""
    pytest.importorskip("dask.array")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("_recalibrate_out_of_core.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parents[1]), *sys.path])}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script), "1", "256"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["x_bytes"] == 2**30
    assert result["generated"] == result["chunks"]  # one pass
    assert result["rss_peak"] - result["rss_before"] < 256 * 2**20
    assert result["num_batches_tracked"] == 1
    np.testing.assert_allclose(result["running_mean"], result["mean"], rtol=2e-7)
    np.testing.assert_allclose(result["running_var"], result["var"], rtol=2e-7)


def test_torch_compiled_model_is_unwrapped(torch: Any) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).double()
    data = torch.randn(20, 3, dtype=torch.float64)
    anybn.torch.recalibrate(torch.compile(model, backend="eager"), data.split(6))
    with torch.no_grad():
        z = model[0](data)
    torch.testing.assert_close(model[1].running_mean, z.mean(0), rtol=1e-12, atol=1e-13)
    assert int(model[1].num_batches_tracked) == 4


def test_jax_transformations_are_refused() -> None:
    jax = pytest.importorskip("jax")
    bn = _layer()
    before = _state(bn)
    x = jax.numpy.ones((4, 3)) + jax.numpy.arange(4.0).reshape(4, 1)
    with pytest.raises(RuntimeError, match="cannot keep JAX tracers"):
        anybn.recalibrate(jax.jit(lambda b: bn(b)), [x], layers=bn)
    _assert_same_state(bn, before)
