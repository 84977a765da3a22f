"""What users run: the stateful layer on every backend, and a small CNN's training step.

``Layer`` times an ``anybn.BatchNorm`` call beside the functional call it makes
(the layer keeps its resolved call, so the difference is its state handling).
``SmallCNN`` times one SGD step of Conv-BN-ReLU twice, Linear-BN1d on 8x8
images, batch 64, with the anybn drop-ins against the same model with ``nn``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import anybn

from .common import BACKENDS, DTYPES, SHAPE_NAMES, SHAPES, make_data, require, set_threads, timing


@timing
class Layer:
    """``anybn.BatchNorm`` (training and eval) against ``anybn.batch_norm`` on the same data."""

    params = (BACKENDS, SHAPE_NAMES, list(DTYPES))
    param_names = ("backend", "shape", "dtype")
    timeout = 300

    def setup(self, backend: str, shape: str, dtype: str) -> None:
        self.backend = require(backend, dtype)
        set_threads()
        self.data = d = make_data(self.backend, SHAPES[shape], dtype)
        self.bn = anybn.BatchNorm(SHAPES[shape].channels, axis=d.axis)
        self.bn(d.x)  # binds the layer to x's library, device and dtype
        self.bn.eval()
        self.bn(d.x)
        self.bn.train()
        self.backend.synchronize()

    def time_layer_train(self, *_: str) -> None:
        self.bn.train()
        self.bn(self.data.x)
        self.backend.synchronize()

    def time_layer_eval(self, *_: str) -> None:
        self.bn.eval()
        self.bn(self.data.x)
        self.backend.synchronize()

    def time_functional_train(self, *_: str) -> None:
        d = self.data
        anybn.batch_norm(
            d.x, d.running_mean, d.running_var, d.weight, d.bias, training=True, axis=d.axis
        )
        self.backend.synchronize()


def small_cnn(drop_in: bool) -> Any:
    """Conv-BN-ReLU twice, then Linear-BN1d, for 1x8x8 images and 10 classes."""
    import torch.nn as nn

    if drop_in:
        import anybn.torch as abt

        bn1d, bn2d = abt.BatchNorm1d, abt.BatchNorm2d
    else:
        bn1d, bn2d = nn.BatchNorm1d, nn.BatchNorm2d
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), bn2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), bn2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 64, bias=False), bn1d(64), nn.ReLU(),
        nn.Linear(64, 10),
    )  # fmt: skip


@timing
class SmallCNN:
    """One SGD training step (forward, loss, backward, update), batch 64: anybn vs nn."""

    params = (["anybn", "torch"],)
    param_names = ("batchnorm",)
    timeout = 300

    def setup(self, batchnorm: str) -> None:
        require("torch", "float32")  # skipped where torch is not installed
        import torch

        set_threads()
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        self.x = torch.from_numpy(rng.standard_normal((64, 1, 8, 8), dtype=np.float32))
        self.target = torch.from_numpy(rng.integers(0, 10, 64))
        self.model = small_cnn(batchnorm == "anybn").train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.loss = torch.nn.CrossEntropyLoss()
        self.time_training_step()

    def time_training_step(self, *_: str) -> None:
        self.optimizer.zero_grad()
        self.loss(self.model(self.x), self.target).backward()
        self.optimizer.step()
