"""The examples: they train, on every backend, follow PyTorch's trajectory, and refuse bad
arguments with a usage error.

``examples/mlp_numpy.py`` (any array-API library), ``examples/torch_convert.py`` (a torch model
converted to the drop-ins) and ``examples/jax_train.py`` (JAX, jit, the statistics as state).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import array_api_compat as compat
import numpy as np
import pytest

from anybn._testing.backends import Backend

STEPS = 40


def _load(name: str) -> ModuleType:
    path = Path(__file__).parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return _load("mlp_numpy")


@pytest.fixture(scope="module")
def numpy_float64(example: ModuleType) -> Any:
    """The reference run: NumPy, float64."""
    return example.train(example.namespace("numpy"), dtype="float64", steps=STEPS)


def test_loss_falls_on_every_backend(
    example: ModuleType, numpy_float64: Any, backend: Backend
) -> None:
    probe = backend.asarray(np.zeros(1))
    result = example.train(compat.array_namespace(probe), device=compat.device(probe), steps=STEPS)
    assert np.mean(result.losses[-5:]) < 0.3 * np.mean(result.losses[:5])
    assert result.accuracy > 0.9
    assert compat.device(result.bn.running_mean) == compat.device(probe)
    # float32 on any backend follows the float64 NumPy trajectory.
    np.testing.assert_allclose(result.losses, numpy_float64.losses, rtol=2e-3, atol=1e-4)


def test_follows_pytorch(example: ModuleType, numpy_float64: Any) -> None:
    """The same network in PyTorch, same init, same batches: the same trajectory."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    x_all, labels = example.make_data(0)
    init = example.init_params(0)
    model = nn.Sequential(
        nn.Linear(example.FEATURES, example.HIDDEN),
        nn.BatchNorm1d(example.HIDDEN),
        nn.ReLU(),
        nn.Linear(example.HIDDEN, example.CLASSES),
    ).double()
    with torch.no_grad():
        for layer, w, b in ((model[0], "w1", "b1"), (model[3], "w2", "b2")):
            layer.weight.copy_(torch.from_numpy(init[w].T))
            layer.bias.copy_(torch.from_numpy(init[b]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.from_numpy(x_all), torch.from_numpy(labels)
    losses = []
    for step in range(STEPS):
        batch = slice((step * 64) % len(x), (step * 64) % len(x) + 64)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    np.testing.assert_allclose(numpy_float64.losses, losses, rtol=1e-9)
    ours, bn = numpy_float64.params, numpy_float64.bn
    np.testing.assert_allclose(ours["w1"], model[0].weight.detach().numpy().T, rtol=1e-8)
    np.testing.assert_allclose(ours["w2"], model[3].weight.detach().numpy().T, rtol=1e-8)
    for name in ("weight", "bias", "running_mean", "running_var"):
        expected = getattr(model[1], name).detach().numpy()
        np.testing.assert_allclose(getattr(bn, name), expected, rtol=1e-8, err_msg=name)
    assert bn.num_batches_tracked == int(model[1].num_batches_tracked) == STEPS


def test_command_line(example: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    example.main(["--steps", "20", "--dtype", "float64"])
    out = capsys.readouterr().out
    assert "step    0  loss" in out and "(numpy)" in out


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--steps", "-3"]])
def test_bad_arguments_are_usage_errors(
    example: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        example.main(argv)
    assert info.value.code == 2
    assert "--steps" in capsys.readouterr().err


def test_a_missing_backend_says_how_to_install_it(
    example: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def absent(name: str) -> Any:
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(example.importlib, "import_module", absent)
    with pytest.raises(SystemExit) as info:
        example.main(["--backend", "cupy"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--backend cupy" in err and "pip install cupy" in err


def test_torch_example_matches_torch_and_learns() -> None:
    pytest.importorskip("torch")
    theirs, ours, accuracy = _load("torch_convert").train(steps=20)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    assert np.mean(ours[-5:]) < 0.3 * np.mean(ours[:5])
    assert accuracy > 0.9


def test_jax_example_learns() -> None:
    pytest.importorskip("jax")
    losses, accuracy = _load("jax_train").train(steps=80)
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5])
    assert accuracy > 0.9
