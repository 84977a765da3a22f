"""``anybn.torch.fold``: fold every batch norm of a model into the layer before it.

Which batch norm may be folded is read from the model's data flow: the graph that
``torch.fx`` traces (with the layers and batch norms kept as leaves), or, for a module
that does not trace, the order of an ``nn.Sequential``'s children, module by module
down the tree. A batch norm is folded only where its input is the output of a
``Conv*d``, ``ConvTranspose*d`` or ``Linear`` and nothing else reads that output; every
other one is left in place, with the reason. The model returned is a copy of the one
given, of its class, with the folded layers' new weights and ``nn.Identity`` in place
of the folded batch norms: the trace decides, it never replaces the model's code.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from typing import Any, Literal, NamedTuple, overload

import torch
from torch import nn

from .._after.fold import fold as fold_weights
from .frozen import FrozenBatchNorm

__all__ = ["FoldReport", "fold"]

#: The layers a batch norm folds into, with the method that computes them.
_LAYERS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Conv1d, "_conv_forward"),
    (nn.Conv2d, "_conv_forward"),
    (nn.Conv3d, "_conv_forward"),
    (nn.ConvTranspose1d, "forward"),
    (nn.ConvTranspose2d, "forward"),
    (nn.ConvTranspose3d, "forward"),
    (nn.Linear, "forward"),
)


class FoldReport(NamedTuple):
    """What :func:`anybn.torch.fold` did, by qualified module name.

    Attributes
    ----------
    folded : list of (str, str)
        ``(layer, batch_norm)`` for each batch norm folded into the layer before it.
    left : list of (str, str)
        ``(batch_norm, reason)`` for each batch norm left in place.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import anybn.torch
    >>> model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).eval()
    >>> anybn.torch.fold(model, report=True)[1]
    FoldReport(folded=[('0', '1')], left=[])
    """

    folded: list[tuple[str, str]]
    left: list[tuple[str, str]]


FoldReport.__module__ = "anybn.torch"


def _layer_base(module: nn.Module) -> type[nn.Module] | None:
    """The layer class whose computation ``module`` has (a subclass that overrides how it
    computes is not one), or None."""
    for base, method in _LAYERS:
        if isinstance(module, base):
            same = getattr(type(module), method) is getattr(base, method)
            return base if same and type(module).forward is base.forward else None
    return None


#: Where the forward of a batch norm that computes the batch-norm formula is defined:
#: PyTorch's modules and anybn's (a subclass with a forward of its own is not folded).
_FORWARD_MODULES = ("torch.nn.modules.batchnorm", "anybn.torch", "anybn.torch.sync",
                    "anybn.torch.frozen")  # fmt: skip


def _is_torchvision_frozen(module: nn.Module) -> bool:
    t = type(module)
    return t.__name__ == "FrozenBatchNorm2d" and t.__module__ == "torchvision.ops.misc"


def _is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch norm (of any kind: foldable or not)."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm)) or (
        _is_torchvision_frozen(module)
    )


def _unfoldable(bn: nn.Module) -> str | None:
    """Why a batch norm cannot be folded, whatever precedes it; None if it can."""
    if not (_is_torchvision_frozen(bn) or type(bn).forward.__module__ in _FORWARD_MODULES):
        return f"its class {type(bn).__qualname__} overrides forward"
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        if bn.running_mean is None or bn.running_var is None:
            return (
                "it has no running statistics (track_running_stats=False): it normalizes "
                "with each batch's statistics"
            )
        if bn.training:
            return "it is in training mode (it normalizes with each batch's statistics)"
    return None


def _state(module: nn.Module) -> list[Any]:
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def _layer_unfoldable(layer: nn.Module) -> str | None:
    if torch.nn.utils.parametrize.is_parametrized(layer):
        return "the layer before it has a parametrized weight"
    return None


def _hooked(module: nn.Module) -> bool:
    return any(
        len(getattr(module, name, {})) > 0
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks")
    )  # fmt: skip


def _out_channels(layer: Any) -> int:
    return int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)


def _bn_arrays(bn: Any) -> tuple[Any, Any, Any, Any, float]:
    return bn.running_mean, bn.running_var, bn.weight, bn.bias, float(bn.eps)


class _Tracer(torch.fx.Tracer):
    """``torch.fx``'s tracer with the layers and every batch norm kept as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _LAYERS_TYPES) or _is_batch_norm(m):
            return True
        return bool(super().is_leaf_module(m, module_qualified_name))


_LAYERS_TYPES = tuple(base for base, _ in _LAYERS)


def _trace(module: nn.Module) -> tuple[torch.fx.Graph | None, str]:
    """The module's fx graph, or None and the first line of why it does not trace."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _Tracer().trace(module), ""
    except Exception as exc:  # TraceError, a Proxy in control flow, anything the code does
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"{type(exc).__name__}: {first}"


class _Plan:
    """The analysis of one model: the pairs to fold and the batch norms left, by name."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.names = {id(m): n for n, m in self.modules.items()}
        occurrences = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.shared_modules = {i for i, c in occurrences.items() if c > 1}
        tensors = Counter(
            id(t) for _, t in model.named_parameters(remove_duplicate=False)
        ) + Counter(id(t) for _, t in model.named_buffers(remove_duplicate=False))
        self.shared_tensors = {i for i, c in tensors.items() if c > 1}
        self.pairs: list[tuple[str, str]] = []
        self.left: dict[str, str] = {}

    # --- the decision for one (producer, batch norm) pair ---

    def consider(self, layer_name: str | None, bn_name: str, why_not: str | None) -> None:
        """Decide on the batch norm ``bn_name`` whose input comes from ``layer_name``."""
        if bn_name in self.left or any(b == bn_name for _, b in self.pairs):
            return
        bn = self.modules[bn_name]
        reason = why_not or _unfoldable(bn)
        if reason is None and layer_name is None:
            reason = "its input is not the output of a Conv, ConvTranspose or Linear layer"
        if reason is None:
            assert layer_name is not None
            layer = self.modules[layer_name]
            reason = self._pair_problem(layer_name, layer, bn_name, bn)
        if reason is None:
            assert layer_name is not None
            self.pairs.append((layer_name, bn_name))
        else:
            self.left[bn_name] = reason

    def _pair_problem(
        self, layer_name: str, layer: nn.Module, bn_name: str, bn: nn.Module
    ) -> str | None:
        if _layer_base(layer) is None:
            kind = type(layer).__qualname__
            return f"the layer before it, {kind} {layer_name!r}, overrides forward"
        problem = _layer_unfoldable(layer)
        if problem is not None:
            return problem
        for name, m in ((layer_name, layer), (bn_name, bn)):
            if id(m) in self.shared_modules:
                return f"module {name!r} appears more than once in the model"
            if any(id(t) in self.shared_tensors for t in _state(m)):
                return f"a parameter or buffer of {name!r} is shared with another module"
            if _hooked(m):
                return f"module {name!r} has hooks, which folding would bypass"
        if any(b == bn_name or lay == layer_name for lay, b in self.pairs):
            return f"{layer_name!r} already has a batch norm folded into it"
        channels = _out_channels(layer)
        bn_channels = int(_bn_arrays(bn)[0].numel())
        if channels != bn_channels and isinstance(layer, nn.Linear):
            # a Linear's features are its output's last dimension, a batch norm's channels
            # dimension 1: on 3-D activations they differ, and the model runs
            return (
                f"the {channels} output features of {layer_name!r} are not its {bn_channels} "
                "channels (it normalizes another dimension of the Linear's output)"
            )
        if channels != bn_channels:
            raise ValueError(
                f"{type(layer).__name__} {layer_name!r} has {channels} output channels but "
                f"the {type(bn).__name__} {bn_name!r} after it has {bn_channels}: the model "
                "cannot run; nothing was folded (the model is unchanged)"
            )
        return None

    # --- finding the pairs ---

    def from_graph(self, graph: torch.fx.Graph, prefix: str) -> None:
        """Every batch norm called in a traced graph (module names relative to ``prefix``)."""

        def full(target: str) -> str:
            return _join(prefix, target)

        def targets(op: str) -> list[str]:
            return [full(n.target) for n in graph.nodes if n.op == op and isinstance(n.target, str)]

        calls = Counter(targets("call_module"))
        attributes = targets("get_attr")

        def read_elsewhere(name: str) -> bool:
            return any(a == name or a.startswith(name + ".") for a in attributes)

        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(node.target, str):
                continue
            bn_name = full(node.target)
            if not _is_batch_norm(self.modules[bn_name]):
                continue
            producer = node.args[0] if node.args else None
            layer_name = None
            why_not = None
            if len(node.args) != 1 or node.kwargs:
                why_not = "it is called with other arguments than its input"
            elif calls[bn_name] > 1:
                why_not = f"it is called {calls[bn_name]} times in the forward"
            elif read_elsewhere(bn_name):
                why_not = "the forward reads its parameters or buffers directly"
            elif (
                isinstance(producer, torch.fx.Node)
                and producer.op == "call_module"
                and isinstance(producer.target, str)
                and isinstance(self.modules[full(producer.target)], _LAYERS_TYPES)
            ):
                layer_name = full(producer.target)
                if len(producer.users) > 1:
                    why_not = f"the output of {layer_name!r} has other consumers"
                elif calls[layer_name] > 1:
                    why_not = f"{layer_name!r} is called {calls[layer_name]} times in the forward"
                elif read_elsewhere(layer_name):
                    why_not = f"the forward reads the parameters of {layer_name!r} directly"
            elif isinstance(producer, torch.fx.Node):
                why_not = (
                    f"its input is not the output of a Conv, ConvTranspose or Linear layer "
                    f"(it comes from {_describe(producer, full)})"
                )
            self.consider(layer_name, bn_name, why_not)

    def from_structure(self, module: nn.Module, prefix: str, failure: str) -> None:
        """A module that does not trace: a Sequential's adjacent children, then each child."""
        children = list(module.named_children())
        if type(module).forward is nn.Sequential.forward and isinstance(module, nn.Sequential):
            previous: tuple[str, nn.Module] | None = None
            for name, child in children:
                if _is_batch_norm(child):
                    why_not = None
                    if previous is None:
                        where = f"nn.Sequential {prefix!r}" if prefix else "the nn.Sequential"
                        why_not = f"its input is the input of {where}"
                    elif not isinstance(previous[1], _LAYERS_TYPES):
                        why_not = (
                            "its input is not the output of a Conv, ConvTranspose or Linear "
                            f"layer (it comes from module {_join(prefix, previous[0])!r})"
                        )
                    layer = None if why_not else _join(prefix, previous[0])  # type: ignore[index]
                    self.consider(layer, _join(prefix, name), why_not)
                previous = (name, child)
        for child_name, child in children:
            self.walk(child, _join(prefix, child_name), failure)

    def walk(self, module: nn.Module, prefix: str, failure: str = "") -> None:
        """Trace ``module``; where it does not trace, go down its structure."""
        if isinstance(module, _LAYERS_TYPES):
            return
        if _is_batch_norm(module):
            if prefix not in self.left and not any(b == prefix for _, b in self.pairs):
                where = f" (torch.fx: {failure})" if failure else ""
                self.left[prefix] = (
                    "the module that calls it does not trace with torch.fx and is not an "
                    f"nn.Sequential{where}"
                )
            return
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            graph, failure_here = None, ""
        else:
            graph, failure_here = _trace(module)
        if graph is not None:
            self.from_graph(graph, prefix)
            for name, m in module.named_modules(prefix=prefix):
                if _is_batch_norm(m) and name not in self.left and not any(
                    b == name for _, b in self.pairs
                ):
                    self.left[name] = "it is not called in the traced forward"
            return
        self.from_structure(module, prefix, failure_here or failure)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _describe(node: torch.fx.Node, full: Any) -> str:
    if node.op == "call_module":
        return f"module {full(node.target)!r}"
    if node.op == "placeholder":
        return f"the input {node.target!r}"
    if node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target))
        return f"{name}()"
    return node.op


def _apply(model: nn.Module, layer_name: str, bn_name: str) -> None:
    """Fold the batch norm ``bn_name`` into ``layer_name`` and put an identity in its place."""
    layer: Any = model.get_submodule(layer_name)
    bn = model.get_submodule(bn_name)
    running_mean, running_var, bn_weight, bn_bias, eps = _bn_arrays(bn)
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    with torch.no_grad():
        folded = fold_weights(
            layer.weight.detach(),
            None if layer.bias is None else layer.bias.detach(),
            running_mean.detach(),
            running_var.detach(),
            None if bn_weight is None else bn_weight.detach(),
            None if bn_bias is None else bn_bias.detach(),
            eps=eps,
            transposed=transposed,
            groups=int(getattr(layer, "groups", 1)),
        )
    grad = layer.weight.requires_grad
    bias_grad = grad if layer.bias is None else layer.bias.requires_grad
    layer.weight = nn.Parameter(folded.weight, requires_grad=grad)
    layer.bias = nn.Parameter(folded.bias, requires_grad=bias_grad)
    parent_name, _, child = bn_name.rpartition(".")
    model.get_submodule(parent_name).add_module(child, nn.Identity())


@overload
def fold(model: nn.Module, *, report: Literal[False] = ...) -> nn.Module: ...
@overload
def fold(model: nn.Module, *, report: Literal[True]) -> tuple[nn.Module, FoldReport]: ...


def fold(model: nn.Module, *, report: bool = False) -> nn.Module | tuple[nn.Module, FoldReport]:
    """A copy of an eval-mode model with every batch norm folded into the layer before it.

    Each ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` (grouped and depthwise included)
    or ``Linear`` whose output goes to a batch norm, and nowhere else, gets the
    weights of :func:`anybn.fold` (computed in float64, rounded once), and the batch
    norm becomes an ``nn.Identity``. Batch norms are ``nn.BatchNorm1d/2d/3d``,
    ``nn.SyncBatchNorm`` (in eval), the :mod:`anybn.torch` modules, and
    :class:`anybn.torch.FrozenBatchNorm` and torchvision's ``FrozenBatchNorm2d``. The data flow is
    read from ``torch.fx``'s trace of the model; for a module that does not trace, from
    the order of the children of its ``nn.Sequential`` containers (see the module
    notes). The copy keeps the model's class and code.

    A batch norm is left in place, and reported, where its input has other
    consumers, comes from something else (an activation, a pooling, the input), or
    it is in training mode, has no running statistics, hooks, a shared parameter,
    is called more than once, or sits in a module that neither traces nor is a
    ``Sequential``. A layer subclass that overrides its computation is not folded into.

    Parameters
    ----------
    model : torch.nn.Module
        An eval-mode model (``model.eval()``); not modified.
    report : bool, optional
        Also return a :class:`anybn.torch.FoldReport` (False: a warning lists the batch norms
        left in place, if any).

    Returns
    -------
    torch.nn.Module or (torch.nn.Module, FoldReport)
        The folded copy (and the report).

    Raises
    ------
    TypeError
        ``model`` is not a ``torch.nn.Module``.
    ValueError
        ``model`` is in training mode (folding uses the running statistics, which a
        training-mode batch norm does not), or a layer's output channels differ from
        the batch norm's after it. The model is never modified.

    Notes
    -----
    A ``Linear`` folds into the ``BatchNorm1d`` after it per output feature: right for
    ``(N, C)`` activations, the usual case; for 3-D activations ``(N, L, C)`` a
    ``BatchNorm1d(C)`` would normalize over ``L`` instead, which runs only where
    ``L == C``: such a model should be folded by hand.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import anybn.torch
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
    ...                       nn.BatchNorm2d(8)).eval()
    >>> folded, report = anybn.torch.fold(model, report=True)
    >>> folded
    Sequential(
      (0): Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
      (1): Identity()
      (2): ReLU()
      (3): BatchNorm2d(8, ...)
    )
    >>> report.folded
    [('0', '1')]
    >>> name, reason = report.left[0]
    >>> name, reason[:40]
    ('3', 'its input is not the output of a Conv, C')
    >>> x = torch.randn(2, 3, 6, 6)
    >>> torch.allclose(folded(x), model(x), atol=1e-6)
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError(
            "fold needs an eval-mode model: it folds the running statistics, which a "
            "training-mode batch norm does not use; call model.eval() first"
        )
    lazy = [
        name
        for name, m in model.named_modules()
        if any(nn.parameter.is_lazy(t) for t in _state(m))
    ]
    if lazy:
        raise ValueError(
            f"model has lazy modules that have not seen an input yet ({', '.join(lazy)}): "
            "their shapes are unknown and PyTorch cannot copy them; run the model on one "
            "batch first"
        )
    copied = copy.deepcopy(model)
    plan = _Plan(copied)
    if _is_batch_norm(copied):
        plan.left[""] = "the model is a batch norm: there is no layer before it"
    else:
        plan.walk(copied, "")
    for layer_name, bn_name in plan.pairs:
        _apply(copied, layer_name, bn_name)
    left = sorted(plan.left.items())
    if not report:
        if left:
            lines = "\n".join(f"  {name or '(the model)'}: {why}" for name, why in left)
            warnings.warn(
                f"anybn.torch.fold left {len(left)} batch norm(s) in place:\n{lines}\n"
                "(pass report=True to get this list instead of a warning)",
                UserWarning,
                stacklevel=2,
            )
        return copied
    return copied, FoldReport(list(plan.pairs), left)
