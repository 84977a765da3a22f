"""The ``anybn-api`` directive: the API reference, generated from ``__all__``.

``.. anybn-api::`` documents every name in ``anybn.__all__`` and then every
public submodule of anybn (``anybn.torch``, ...) with every name in its
``__all__``, so a new public name appears in the reference without editing
the docs. Functions get ``autofunction``, classes ``autoclass`` (with their
public members, except NamedTuples, whose fields the numpydoc ``Attributes``
section already describes), other objects ``autodata``.

A public submodule that cannot be imported (its optional dependency is
missing) is a warning, so ``-W`` builds fail rather than silently leaving it out.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

logger = logging.getLogger(__name__)

PACKAGE = "anybn"

#: What to say about public plain values, which carry no docstring of their own.
DATA_DOCS = {"__version__": "The version of anybn, a :pep:`440` string."}


def public_submodules(package: ModuleType) -> list[str]:
    """Names of the package's public submodules (no leading underscore)."""
    return sorted(
        f"{package.__name__}.{info.name}"
        for info in pkgutil.iter_modules(package.__path__)
        if not info.name.startswith("_")
    )


def _is_namedtuple(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")


def directive_for(qualname: str, obj: object) -> list[str]:
    """The autodoc directive lines for one public object."""
    if inspect.isclass(obj):
        lines = [f".. autoclass:: {qualname}"]
        if not _is_namedtuple(obj):
            lines += ["   :members:", "   :show-inheritance:"]
        return lines
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return [f".. autofunction:: {qualname}"]
    if inspect.ismodule(obj):
        return [f".. automodule:: {obj.__name__}", "   :no-index:"]
    if inspect.getdoc(obj) == inspect.getdoc(type(obj)):
        # A plain value (``__version__``): its "docstring" would be its type's.
        module, _, name = qualname.rpartition(".")
        what = DATA_DOCS.get(name, f"``{name}`` of :mod:`{module}`.")
        # Unqualified: the automodule above has set the current module.
        return [f".. py:data:: {name}", f"   :value: {obj!r}", "", f"   {what}"]
    return [f".. autodata:: {qualname}"]


def _reading_order(obj: object) -> int:
    """Where a kind of object comes on the page: the functions a user calls first, then the
    classes, modules, and last the typing helpers (protocols) and plain values."""
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return 0
    if inspect.isclass(obj):
        return 2 if getattr(obj, "_is_protocol", False) else 1
    if inspect.ismodule(obj):
        return 1
    return 3


def module_section(module: ModuleType, underline: str) -> list[str]:
    """rST for one module: a title, its docstring, a summary table, every public name (the
    functions first, then classes, then typing helpers and values, each in ``__all__``'s
    order)."""
    names = sorted(
        getattr(module, "__all__", []), key=lambda n: _reading_order(getattr(module, n))
    )
    title = f"``{module.__name__}``"
    lines = [title, underline * len(title), "", f".. automodule:: {module.__name__}", ""]
    documented = [n for n in names if not (n.startswith("__") and n.endswith("__"))]
    if documented:
        lines += [".. autosummary::", ""]
        lines += [f"   {n}" for n in documented]
        lines += [""]
    for name in names:
        lines += directive_for(f"{module.__name__}.{name}", getattr(module, name))
        lines += [""]
    return lines


class AnybnAPI(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        package = importlib.import_module(PACKAGE)
        lines = module_section(package, "-")
        for modname in public_submodules(package):
            try:
                module = importlib.import_module(modname)
            except ImportError as exc:
                logger.warning(
                    "anybn-api: cannot import %s (%s); install its optional dependency "
                    "to document it",
                    modname,
                    exc,
                    location=self.get_location(),
                )
                continue
            lines += module_section(module, "-")
        container = nodes.section()
        container.document = self.state.document
        source = StringList(lines, source=f"<anybn-api in {self.env.docname}>")
        nested_parse_with_titles(self.state, source, container)
        return container.children


def public_bases(app: Sphinx, name: str, obj: object, options: object, bases: list) -> None:
    """Show only public bases: anybn.torch's modules list nn.BatchNorm2d, not the private mixin."""
    bases[:] = [b for b in bases if not getattr(b, "__name__", "").startswith("_")]


def setup(app: Sphinx) -> dict[str, object]:
    app.add_directive("anybn-api", AnybnAPI)
    app.connect("autodoc-process-bases", public_bases)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
