"""One rank of tests/test_renorm_distributed.py: synchronised batch renormalization.

Usage: ``python _dist_renorm_worker.py ENGINE renorm WORKDIR``, started as the ranks of
tests/_dist_worker.py are (its :class:`Rank` sets up the group); never collected. Each rank
runs two renorm training steps on its shard of ``WORKDIR/inputs.npz`` with ``comm=`` and
writes ``rank{r}.npz`` / ``rank{r}.json`` (``"done": true`` last).
"""

from __future__ import annotations

import faulthandler
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist_worker as worker

#: The options of every step (the clipping tight enough to be active).
OPTIONS: dict[str, Any] = {
    "momentum": 0.3, "renorm_momentum": 0.4, "eps": 1e-3,
    "renorm_clipping": {"rmin": 0.8, "rmax": 1.25, "dmax": 0.5},
}  # fmt: skip
STATE_KEYS = ("running_mean", "running_var", "running_std", "renorm_mean", "renorm_std")


def renorm_steps(x: Any, dy: Any, data: dict, comm: Any, to: Any) -> dict[str, Any]:
    """Two renorm steps (x, then x + 1) with forward and backward; every output, by name."""
    import anybn

    state = {k: to(data["state"][i]) for i, k in enumerate(STATE_KEYS)}
    w, b = to(data["weight"]), to(data["bias"])
    out: dict[str, Any] = {}
    for step in range(2):
        xs = x + step
        o = anybn.batch_norm(
            xs, state["running_mean"], state["running_var"], w, b, training=True, renorm=True,
            renorm_mean=state["renorm_mean"], renorm_std=state["renorm_std"],
            running_std=state["running_std"], comm=comm, **OPTIONS,
        )  # fmt: skip
        g = anybn.batch_norm_backward(
            dy, xs, w, o.mean, o.invstd, renorm_r=o.r, renorm_d=o.d, comm=comm
        )
        state = dict(zip(STATE_KEYS, (o.new_running_mean, o.new_running_var,
                                      o.new_running_std, o.new_renorm_mean, o.new_renorm_std),
                         strict=True))  # fmt: skip
        for k, v in (*o._asdict().items(), *g._asdict().items()):
            out[f"{step}:{k}"] = v
    return out


def main() -> None:
    faulthandler.enable()
    engine, workdir = sys.argv[1], Path(sys.argv[3])
    r = worker.Rank(engine, workdir)
    data = dict(np.load(workdir / "inputs.npz"))
    try:
        lo, hi = worker.shard_bounds(list(data["splits"]), r.rank)
        x, dy = data["x3"][lo:hi], data["dy3"][lo:hi]
        for k, v in renorm_steps(x, dy, data, r.comm, np.asarray).items():
            r.arrays[f"numpy:{k}"] = worker.to_numpy(v)
        # anybn.BatchNorm(renorm=True, comm=...): two synchronised steps of the layer
        import anybn

        bn = anybn.BatchNorm(
            3, comm=r.comm, eps=OPTIONS["eps"], momentum=OPTIONS["momentum"], renorm=True,
            renorm_clipping=OPTIONS["renorm_clipping"],
            renorm_momentum=OPTIONS["renorm_momentum"],
        )  # fmt: skip
        bn.weight, bn.bias = data["weight"].copy(), data["bias"].copy()
        for i, k in enumerate(STATE_KEYS):
            setattr(bn, k, data["state"][i].copy())
        for step in range(2):
            r.arrays[f"layer:{step}:y"] = bn(x + step)
            g = bn.backward(dy)
            r.arrays[f"layer:{step}:dx"] = g.dx
            r.arrays[f"layer:{step}:dweight"] = g.dweight
            for k in STATE_KEYS:
                r.arrays[f"layer:{step}:{k}"] = getattr(bn, k)
        if engine == "gloo":  # torch autograd through the synchronised renorm forward
            import torch

            import anybn

            xt = torch.from_numpy(x).requires_grad_()
            w = torch.from_numpy(data["weight"]).requires_grad_()
            b = torch.from_numpy(data["bias"]).requires_grad_()
            state = {k: torch.from_numpy(data["state"][i]) for i, k in enumerate(STATE_KEYS)}
            o = anybn.batch_norm(
                xt, state["running_mean"], state["running_var"], w, b, training=True,
                renorm=True, renorm_mean=state["renorm_mean"], renorm_std=state["renorm_std"],
                running_std=state["running_std"], comm=r.comm, **OPTIONS,
            )  # fmt: skip
            o.y.backward(torch.from_numpy(dy))
            r.arrays["autograd:y"] = worker.to_numpy(o.y)
            r.arrays["autograd:dx"] = worker.to_numpy(xt.grad)
            r.arrays["autograd:dweight"] = worker.to_numpy(w.grad)
            r.arrays["autograd:dbias"] = worker.to_numpy(b.grad)

            # anybn.torch.SyncBatchNorm(renorm=True): the module, synchronised
            import anybn.torch as abt

            m = abt.SyncBatchNorm(
                3, eps=OPTIONS["eps"], momentum=OPTIONS["momentum"], renorm=True,
                renorm_clipping=OPTIONS["renorm_clipping"],
                renorm_momentum=OPTIONS["renorm_momentum"],
            ).double()  # fmt: skip
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(data["weight"]))
                m.bias.copy_(torch.from_numpy(data["bias"]))
                for i, k in enumerate(STATE_KEYS):
                    getattr(m, k).copy_(torch.from_numpy(data["state"][i]))
            xm = torch.from_numpy(x).requires_grad_()
            ym = m(xm)
            ym.backward(torch.from_numpy(dy))
            r.arrays["module:y"], r.arrays["module:dx"] = (
                worker.to_numpy(ym),
                worker.to_numpy(xm.grad),
            )
            r.arrays["module:dweight"] = worker.to_numpy(m.weight.grad)
            r.arrays["module:dbias"] = worker.to_numpy(m.bias.grad)
            for k in STATE_KEYS:
                r.arrays[f"module:{k}"] = worker.to_numpy(getattr(m, k))
        r.report["done"] = True
        r.save()
    finally:
        if engine == "gloo":
            worker.shutdown(r, "renorm")


if __name__ == "__main__":
    main()
