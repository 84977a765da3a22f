"""Real training code: what a PyTorch user meets in the first hour, and the layer's safety.

Each test here failed on the main branch before issue 8: running statistics kept on
the autograd graph (memory growth, "backward through the graph a second time"),
saved tensors aliasing buffers, lost memory formats, empty batches, copying and
pickling, threads, masked arrays, one non-finite channel spoiling the others, and
unclear errors. Siblings of each (other backends, dtypes, adapters, arguments) are
tested beside it.
"""

from __future__ import annotations

import copy
import gc
import pickle
import threading
from typing import Any

import numpy as np
import pytest
from _fresh import fresh_process

import anybn
from anybn._kernels import numpy_blocks as _numpy_kernels

torch = pytest.importorskip("torch")
import anybn.torch as abt  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """The torch tests draw from torch's global generator: seed it (NumPy data is seeded)."""
    torch.manual_seed(20261126)


# --- 1. running statistics never hold an autograd graph -----------------------------------


def test_layer_running_stats_never_require_grad() -> None:
    bn = anybn.BatchNorm(4)
    x = torch.randn(8, 4, requires_grad=True)
    for _ in range(3):
        bn(x).sum().backward()
    assert not bn.running_mean.requires_grad and not bn.running_var.requires_grad
    assert all(not v.requires_grad for v in bn.state_dict().values())
    # eval forward + backward after training steps: no "backward through the graph twice"
    bn.eval()
    bn(x).sum().backward()


@pytest.mark.parametrize("training", [True, False])
def test_functional_running_stats_never_require_grad(training: bool) -> None:
    x = torch.randn(8, 4, requires_grad=True)
    w = torch.ones(4, requires_grad=True)
    rm = torch.zeros(4, requires_grad=True)  # even differentiable inputs: never differentiated
    rv = torch.ones(4, requires_grad=True)
    out = anybn.batch_norm(x, rm, rv, w, training=training)
    assert out.y.requires_grad
    if training:
        assert not out.new_running_mean.requires_grad
        assert not out.new_running_var.requires_grad


@pytest.mark.parametrize(
    ("shape", "requires_grad"), [((4,), False), ((4,), True), ((1, 4), False), ((4, 1), False)]
)
def test_drop_in_updates_buffers_of_any_shape_outside_autograd(
    shape: tuple[int, ...], requires_grad: bool
) -> None:
    # The drop-in stores the new statistics in place: a buffer that requires grad is
    # updated without recording a graph, (1, C) and (C, 1) buffers keep their shape.
    x = torch.randn(8, 4)
    ref_mean, ref_var = torch.zeros(4), torch.ones(4)
    abt.batch_norm(x, ref_mean, ref_var, training=True)
    rm = torch.zeros(shape, requires_grad=requires_grad)
    rv = torch.ones(shape, requires_grad=requires_grad)
    abt.batch_norm(x, rm, rv, training=True)
    for buffer, ref in ((rm, ref_mean), (rv, ref_var)):
        assert buffer.shape == shape and buffer.grad_fn is None
        assert buffer.requires_grad == requires_grad
        torch.testing.assert_close(buffer.detach().reshape(-1), ref, rtol=0, atol=0)


def test_layer_memory_flat_over_1000_steps() -> None:
    """1,000 training steps with inputs that require grad hold memory flat."""
    bn = anybn.BatchNorm(16)
    x = torch.randn(32, 16, requires_grad=True)

    def live_tensors() -> int:
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    for _ in range(50):
        bn(x).sum().backward()
    before = live_tensors()
    for _ in range(1000):
        bn(x).sum().backward()
    assert live_tensors() <= before + 5
    assert bn.num_batches_tracked == 1050


# --- 2. nothing saved for backward aliases a buffer a later call changes ----------------------


@pytest.mark.parametrize("cls", [abt.BatchNorm1d, abt.BatchNorm2d, abt.BatchNorm3d])
def test_eval_then_train_then_backward_of_eval_output(cls: Any) -> None:
    """The eval output's gradient uses the statistics of its own forward.

    (torch's module runs too, but differentiates with the buffers as they are at
    backward time, after the training step changed them in place.)
    """
    shape = {
        abt.BatchNorm1d: (4, 3),
        abt.BatchNorm2d: (4, 3, 2, 2),
        abt.BatchNorm3d: (4, 3, 2, 2, 2),
    }
    m = cls(3)
    with torch.no_grad():
        m.running_var.uniform_(0.5, 2.0)
    expected = (1 / torch.sqrt(m.running_var + m.eps)).reshape(1, 3, *[1] * (len(shape[cls]) - 2))
    x = torch.randn(*shape[cls], requires_grad=True)
    y_eval = m.eval()(x)
    m.train()(torch.randn(*shape[cls]) * 5)  # updates the buffers in place
    y_eval.sum().backward()
    torch.testing.assert_close(x.grad, expected.expand_as(x))


def test_eval_mean_is_not_the_running_mean() -> None:
    rm, rv = np.zeros(3), np.ones(3)
    out = anybn.batch_norm(np.random.default_rng(0).standard_normal((4, 3)), rm, rv)
    assert out.mean is not rm and not np.shares_memory(out.mean, rm)
    t_rm = torch.zeros(3)
    t_out = anybn.batch_norm(torch.randn(4, 3), t_rm, torch.ones(3))
    assert t_out.mean.data_ptr() != t_rm.data_ptr()


# --- 3. memory formats are kept ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape", [(4, 8, 3, 3), (4, 8, 16, 16), (8, 16, 32, 32), (2, 8, 4, 4, 4)])
def test_channels_last_kept(dtype: Any, shape: tuple[int, ...]) -> None:
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(*shape, dtype=dtype).contiguous(memory_format=fmt)
    cls = abt.BatchNorm2d if len(shape) == 4 else abt.BatchNorm3d
    m = cls(shape[1], dtype=torch.float32 if dtype == torch.float16 else dtype)
    assert m(x).is_contiguous(memory_format=fmt)
    out = anybn.batch_norm(x, training=True)
    assert out.y.is_contiguous(memory_format=fmt)
    g = anybn.batch_norm_backward(torch.randn_like(x), x, None, out.mean, out.invstd)
    assert g.dx.is_contiguous(memory_format=fmt)
    xr = x.detach().requires_grad_()
    m(xr).sum().backward()
    assert xr.grad.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (64, 8, 32, 32)])
def test_numpy_output_keeps_axis_order_of_strides(shape: tuple[int, ...]) -> None:
    n, c, h, w = shape
    x = np.random.default_rng(1).standard_normal((n, h, w, c)).transpose(0, 3, 1, 2)
    out = anybn.batch_norm(x, training=True)
    assert out.y.strides == x.strides
    g = anybn.batch_norm_backward(np.ones_like(x), x, None, out.mean, out.invstd)
    assert np.argsort(g.dx.strides).tolist() == np.argsort(x.strides).tolist()


# --- 4. empty batches --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [abt.BatchNorm1d, abt.BatchNorm2d, abt.BatchNorm3d])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_like_torch(cls: Any, momentum: float | None) -> None:
    shape = {
        abt.BatchNorm1d: (0, 3),
        abt.BatchNorm2d: (0, 3, 2, 2),
        abt.BatchNorm3d: (0, 3, 1, 2, 2),
    }
    results = []
    for m in (cls(3, momentum=momentum), getattr(torch.nn, cls.__name__)(3, momentum=momentum)):
        x = torch.randn(*shape[cls], requires_grad=True)
        y = m(x)
        y.sum().backward()
        results.append((y.shape, m.running_mean, m.running_var, int(m.num_batches_tracked)))
        assert torch.equal(m.weight.grad, torch.zeros(3))
        assert torch.equal(m.bias.grad, torch.zeros(3))
    (s0, rm0, rv0, n0), (s1, rm1, rv1, n1) = results
    assert s0 == s1 and n0 == n1 == 1
    torch.testing.assert_close(rm0, rm1)
    torch.testing.assert_close(rv0, rv1)


def test_empty_batch_core_and_layer() -> None:
    rm, rv = np.full(3, 0.5), np.full(3, 2.0)
    out = anybn.batch_norm(np.empty((0, 3, 4)), rm, rv, training=True)
    assert out.y.shape == (0, 3, 4)
    assert np.array_equal(out.new_running_mean, rm) and out.new_running_mean is not rm
    g = anybn.batch_norm_backward(
        np.empty((0, 3, 4)), np.empty((0, 3, 4)), None, out.mean, out.invstd
    )
    assert g.dx.shape == (0, 3, 4) and not g.dweight.any() and not g.dbias.any()
    bn = anybn.BatchNorm(3)
    bn(np.empty((0, 3)))
    assert bn.num_batches_tracked == 1
    assert np.array_equal(bn.running_mean, np.zeros(3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        anybn.batch_norm(np.ones((1, 3)), training=True)  # exactly one value still raises
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        abt.BatchNorm1d(3)(torch.ones(1, 3))


# --- 5. anybn.torch accepts what torch accepts --------------------------------------------


@pytest.mark.parametrize("momentum", [-1.2, 1.5, 0.0, 1.0])
def test_any_momentum_torch_accepts(momentum: float) -> None:
    x = torch.randn(6, 3)
    for training in (True, False):
        rm_t, rv_t, rm_o, rv_o = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)
        y_t = torch.nn.functional.batch_norm(x, rm_t, rv_t, training=training, momentum=momentum)
        y_o = abt.batch_norm(x, rm_o, rv_o, training=training, momentum=momentum)
        torch.testing.assert_close(y_o, y_t)
        torch.testing.assert_close(rm_o, rm_t)
        torch.testing.assert_close(rv_o, rv_t)


@pytest.mark.parametrize(
    "case",
    [
        "rm_size",
        "weight_size",
        "eps_negative_train",
        "eps_zero_train",
        "eps_negative_eval",
        "eval_no_running",
        "only_running_mean_train",
        "only_running_var_eval",
        "one_value",
        "int_input",
        "mixed_dtype",
        "device",
        "weight_not_tensor",
        "training_not_bool",
    ],
)
def test_functional_errors_match_torch(case: str) -> None:
    x = torch.randn(2, 10)
    rm, rv = torch.zeros(10), torch.ones(10)
    args: dict[str, Any] = {
        "rm_size": ((x, torch.rand(9), rv), {}),
        "weight_size": ((x, rm, rv, torch.ones(9)), {"training": True}),
        "eps_negative_train": ((x, rm, rv), {"training": True, "eps": -1}),
        "eps_zero_train": ((x, rm, rv), {"training": True, "eps": 0.0}),
        "eps_negative_eval": ((x, rm, rv), {"eps": -1e-5}),
        "eval_no_running": ((x, None, None), {}),
        "only_running_mean_train": ((x, rm, None), {"training": True}),
        "only_running_var_eval": ((x, None, rv), {}),
        "one_value": ((torch.randn(1, 10), rm, rv), {"training": True}),
        "int_input": ((torch.ones(2, 10, dtype=torch.long), None, None), {"training": True}),
        "mixed_dtype": ((x, rm.double(), rv.double()), {"training": True}),
        "device": ((x, rm.to("meta"), rv.to("meta")), {"training": True}),
        "weight_not_tensor": ((x, None, None, [1.0] * 10), {"training": True}),
        "training_not_bool": ((x, None, None), {"training": 1}),
    }[case]
    with pytest.raises(Exception) as theirs:
        torch.nn.functional.batch_norm(*args[0], **args[1])
    before = [a.clone() for a in args[0] if isinstance(a, torch.Tensor) and a.device.type != "meta"]
    with pytest.raises(type(theirs.value)) as ours:
        abt.batch_norm(*args[0], **args[1])
    if case not in ("weight_not_tensor", "training_not_bool"):  # torch's arg parser wording
        assert str(ours.value) == str(theirs.value)
    after = [a for a in args[0] if isinstance(a, torch.Tensor) and a.device.type != "meta"]
    for a, b in zip(after, before, strict=True):
        assert torch.equal(a, b)


def test_eps_zero_in_eval_like_torch() -> None:
    x = torch.randn(4, 3)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    torch.testing.assert_close(
        abt.batch_norm(x, rm, rv, eps=0.0), torch.nn.functional.batch_norm(x, rm, rv, eps=0.0)
    )


# --- 7. checkpoints ---------------------------------------------------------------------------


def test_checkpoint_without_num_batches_tracked() -> None:
    source = torch.nn.BatchNorm2d(3)
    source(torch.randn(4, 3, 2, 2) + 1)
    old = {
        k: v for k, v in source.state_dict().items() if k != "num_batches_tracked"
    }  # a plain dict
    for m in (torch.nn.BatchNorm2d(3), abt.BatchNorm2d(3)):
        m.load_state_dict(old, strict=True)
        torch.testing.assert_close(m.running_mean, source.running_mean)
        assert int(m.num_batches_tracked) == 0
    bn = anybn.BatchNorm(3)
    bn.num_batches_tracked = 4
    assert bn.load_state_dict(old) == ([], [])
    assert bn.num_batches_tracked == 4  # torch's rule: the module's own counter stays
    np.testing.assert_allclose(bn.running_mean, source.running_mean.numpy(), rtol=1e-6)


def test_load_state_dict_strict_false_reports_keys() -> None:
    bn = anybn.BatchNorm(3)
    before = bn.state_dict()
    result = bn.load_state_dict({"weight": np.full(3, 2.0), "extra": np.ones(3)}, strict=False)
    assert result.missing_keys == ["bias", "running_mean", "running_var"]
    assert result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(bn.weight, np.full(3, 2.0))
    np.testing.assert_array_equal(bn.bias, before["bias"])
    with pytest.raises(ValueError, match="unexpected keys"):
        bn.load_state_dict({**before, "extra": np.ones(3)})
    lazy = anybn.BatchNorm()
    lazy.load_state_dict({"running_mean": np.ones(5)}, strict=False)
    assert lazy.num_features == 5 and lazy.weight.shape == (5,)


@pytest.mark.parametrize(
    "counter", [np.uint64(2**64 - 1), 2**63, torch.tensor(-1), np.array(2**63, dtype=np.uint64)]
)
def test_counter_beyond_int64_refused_at_load(counter: Any) -> None:
    bn = anybn.BatchNorm(2)
    state = bn.state_dict()
    with pytest.raises(ValueError, match="num_batches_tracked"):
        bn.load_state_dict({**state, "num_batches_tracked": counter})
    assert bn.num_batches_tracked == 0
    bn.load_state_dict({**state, "num_batches_tracked": 2**63 - 1})
    bn.state_dict()  # still representable


def test_convert_keeps_hooks_and_attributes() -> None:
    calls: list[str] = []
    bn = torch.nn.BatchNorm2d(3, bias=False)
    bn.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    handle = bn.register_forward_hook(lambda m, args, out: calls.append("post"))
    bn.register_full_backward_hook(lambda m, gi, go: calls.append("backward"))
    bn.custom_tag = "kept"
    model = abt.convert(torch.nn.Sequential(bn))
    assert type(model[0]) is abt.BatchNorm2d and model[0].bias is None
    assert model[0].custom_tag == "kept"
    x = torch.randn(2, 3, 2, 2, requires_grad=True)
    model(x).sum().backward()
    assert calls == ["pre", "post", "backward"]
    handle.remove()
    model(x)
    assert calls[-1] == "pre"


# --- 8. copying and pickling ------------------------------------------------------------------


@pytest.mark.parametrize("library", ["numpy", "torch", "array_api_strict"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "copy"])
def test_layer_copies_round_trip(library: str, how: str) -> None:
    import importlib

    lib = importlib.import_module(library if library != "array_api_strict" else "array_api_strict")
    if library == "torch":
        x = torch.randn(8, 3, 4, dtype=torch.float64)
    else:
        x = lib.asarray(np.random.default_rng(3).standard_normal((8, 3, 4)))
    bn = anybn.BatchNorm(3, xp=lib if library == "numpy" else None)
    bn(x)
    clone = {"deepcopy": copy.deepcopy, "copy": copy.copy, "pickle": _pickled}[how](bn)
    for layer in (bn, clone):
        layer.eval()
    np.testing.assert_array_equal(np.asarray(clone(x)), np.asarray(bn(x)))
    assert clone.num_batches_tracked == bn.num_batches_tracked
    clone.train()
    clone(x)  # the copy keeps working, and does not touch the original
    assert bn.num_batches_tracked == 1 and clone.num_batches_tracked == 2
    copied = {"deepcopy": copy.deepcopy, "copy": copy.copy, "pickle": _pickled}[how](bn)
    with pytest.raises(RuntimeError, match="forward first"):  # copies carry no saved forward
        copied.backward(x)


def _pickled(layer: Any) -> Any:
    return pickle.loads(pickle.dumps(layer))


# --- 9. threads -------------------------------------------------------------------------------


def test_set_num_threads_while_other_threads_run() -> None:
    x = np.random.default_rng(4).standard_normal((64, 8, 64, 64)).astype(np.float32)  # blocked path
    errors: list[BaseException] = []
    expected = anybn.batch_norm(x, training=True).y

    def work() -> None:
        try:
            for _ in range(4):
                np.testing.assert_allclose(
                    anybn.batch_norm(x, training=True).y, expected, atol=1e-5
                )
        except BaseException as exc:  # reported below
            errors.append(exc)

    previous = _numpy_kernels.get_num_threads()
    threads = [threading.Thread(target=work) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        for n in (1, 3, 2, 4, 1, 2) * 3:
            _numpy_kernels.set_num_threads(n)
        for t in threads:
            t.join(timeout=120)
    finally:
        _numpy_kernels.set_num_threads(previous)
    assert not errors, errors


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_layer_shared_by_threads_counts_every_batch(library: str) -> None:
    rng = np.random.default_rng(5)
    batches = [rng.standard_normal((16, 4)) + i for i in range(80)]
    if library == "torch":
        batches = [torch.from_numpy(b) for b in batches]
    bn = anybn.BatchNorm(4, momentum=None)  # cumulative average: order-independent result
    grads: dict[int, Any] = {}

    def work(part: list[int]) -> None:
        for i in part:
            y = bn(batches[i])
            grads[i] = (y, bn.backward(batches[i] * 0 + 1))

    threads = [threading.Thread(target=work, args=(list(range(k, 80, 2)),)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert bn.num_batches_tracked == 80
    means = np.stack([np.asarray(b).mean(axis=0) for b in batches])
    np.testing.assert_allclose(np.asarray(bn.running_mean), means.mean(axis=0), rtol=1e-10)
    for i, (_, g) in grads.items():  # each backward paired with its own thread's forward
        np.testing.assert_allclose(np.asarray(g.dbias), np.full(4, 16.0))
        assert g.dx.shape == batches[i].shape


# --- 10. silent wrong numbers -------------------------------------------------------------


def test_masked_arrays_refused() -> None:
    x = np.ma.masked_array(np.random.default_rng(6).standard_normal((4, 3)), mask=np.eye(4, 3))
    with pytest.raises(TypeError, match="masked array"):
        anybn.batch_norm(x, training=True)
    with pytest.raises(TypeError, match="weight is a NumPy masked array"):
        anybn.batch_norm(x.data, weight=np.ma.masked_array(np.ones(3)), training=True)
    bn = anybn.BatchNorm(3)
    with pytest.raises(TypeError, match="masked array"):
        bn(x)
    assert bn.num_batches_tracked == 0
    with pytest.raises(TypeError, match="masked array"):
        bn.load_state_dict({**bn.state_dict(), "weight": np.ma.masked_array(np.ones(3))})


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize(
    "shape", [(16, 2), (4096, 2), (64, 2, 8, 8), (64, 2, 32, 32), (128, 2, 64, 64)]
)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_non_finite_value_stays_in_its_channel(
    library: str, shape: tuple[int, ...], bad: float, layout: str
) -> None:
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) + 1e4).astype(np.float32)
    ref = anybn.batch_norm(x.astype(np.float64), training=True).y[:, 0]
    x[(0, 1) + (0,) * (len(shape) - 2)] = bad
    xs: Any = x
    if library == "torch":
        xs = torch.from_numpy(x)
        if layout == "channels_last":
            xs = xs.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last":
        xs = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    y = np.asarray(anybn.batch_norm(xs, training=True).y)[:, 0]
    assert np.max(np.abs(y - ref)) < 1e-5  # clean channels keep anybn's accuracy (~3e-7)


# --- 11. clear errors -------------------------------------------------------------------------


def test_clear_errors_name_the_argument() -> None:
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match=r"^eps must be a finite float"):
        anybn.batch_norm(x, training=True, eps=10**400)
    with pytest.raises(ValueError, match=r"^momentum must be a finite float"):
        anybn.batch_norm(x, training=True, momentum=10**400)
    with pytest.raises(ValueError, match=r"^eps"):
        anybn.BatchNorm(3, eps=10**400)
    for name, args in {
        "dy": (None, x, None, np.ones(3), np.ones(3)),
        "mean": (x, x, None, None, np.ones(3)),
        "invstd": (x, x, None, np.ones(3), None),
    }.items():
        with pytest.raises(TypeError, match=f"^{name} must be an array"):
            anybn.batch_norm_backward(*args)
    with pytest.raises(TypeError, match=r"^xp must be an array namespace"):
        anybn.BatchNorm(3, xp="numpy")
    with pytest.raises(TypeError, match=r"^xp must be an array namespace"):
        anybn.batch_norm(x, training=True, xp="numpy")
    bn = anybn.BatchNorm(2)
    with pytest.raises(ValueError, match=r"state_dict\['weight'\]"):
        bn.load_state_dict({**bn.state_dict(), "weight": [[1.0], [2.0, 3.0]]})
    with pytest.raises(RuntimeError, match=r"does not support torch\.jit\.script"):
        torch.jit.script(abt.BatchNorm1d(3))


def test_big_endian_and_numpy_bools_accepted() -> None:
    x = np.random.default_rng(8).standard_normal((4, 3))
    out = anybn.batch_norm(
        x.astype(">f4"), np.zeros(3, np.float32), np.ones(3, np.float32), training=np.True_
    )
    expected = anybn.batch_norm(
        x.astype(np.float32), np.zeros(3, np.float32), np.ones(3, np.float32), training=True
    )
    np.testing.assert_array_equal(out.y, expected.y)
    np.testing.assert_array_equal(out.new_running_var, expected.new_running_var)
    with pytest.raises(
        TypeError, match="running_mean must have dtype float32 for x of dtype float32, got float64"
    ):
        anybn.batch_norm(x.astype(">f4"), np.zeros(3), np.ones(3), training=True)
    bn = anybn.BatchNorm(3, affine=np.True_, track_running_stats=np.False_)
    bn.train(np.False_)
    assert bn.training is False and bn.affine is True and bn.track_running_stats is False
    g = anybn.batch_norm_backward(x, x, None, x.mean(0), 1 / x.std(0), training=np.False_)
    np.testing.assert_allclose(g.dx, x / x.std(0))


def test_layer_with_a_communicator_copies_and_refuses_pickle() -> None:
    """A deep copy shares the communicator (it belongs to the process); pickling says why not."""

    class Communicator:
        def __reduce__(self) -> Any:
            raise TypeError("a communicator does not pickle")

    bn = anybn.BatchNorm(3)
    bn.comm = Communicator()
    x = np.random.default_rng(9).standard_normal((4, 3))
    clone = copy.deepcopy(bn)
    assert clone.comm is bn.comm
    np.testing.assert_array_equal(clone.eval()(x), bn.eval()(x))
    with pytest.raises(TypeError, match="cannot pickle a BatchNorm whose comm"):
        pickle.dumps(bn)
    bn.comm = "torch"  # names pickle
    assert pickle.loads(pickle.dumps(bn)).comm == "torch"


@fresh_process(timeout=300)
def test_core_on_tensors_under_torch_func_and_forward_ad() -> None:
    """anybn.batch_norm called directly inside torch.func transforms and forward AD.

    The fast paths (NumPy views, ``.item()``, in-place temporaries) step aside for
    the generic path, whose torch operations compose with the transforms.
    """
    import torch.autograd.forward_ad as fwAD
    from torch.func import grad, jvp, vmap

    def dx(xi: Any) -> Any:
        out = anybn.batch_norm(xi, training=True)
        return anybn.batch_norm_backward(xi * 0.5, xi, None, out.mean, out.invstd).dx

    x = torch.randn(3, 64, 8, 5, dtype=torch.float64)  # large enough for the torch kernels
    expected = torch.stack([dx(xi) for xi in x])
    torch.testing.assert_close(vmap(dx)(x), expected)

    def loss(xi: Any) -> Any:
        return anybn.batch_norm(xi, training=True).y.pow(3).sum()

    ref = x[0].clone().requires_grad_()
    loss(ref).backward()
    torch.testing.assert_close(grad(loss)(x[0]), ref.grad)
    t = torch.randn_like(x[0])
    _, tangent = jvp(lambda xi: anybn.batch_norm(xi, training=True).y, (x[0],), (t,))
    with fwAD.dual_level():
        y = anybn.batch_norm(fwAD.make_dual(x[0], t), training=True).y
        torch.testing.assert_close(fwAD.unpack_dual(y).tangent, tangent)
    assert tangent.abs().sum() > 0
