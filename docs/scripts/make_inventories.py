"""Write the small intersphinx inventories under ``docs/_inventories/``.

The docs build has no network (CI reaches only PyPI), and a remote inventory
fetch that fails is a warning, which ``-W`` turns into an error. So the docs
link to NumPy, PyTorch, CuPy and the array API standard through hand-made
inventories listing only the objects these pages reference, each with its real
URL under the project's real base URL (``intersphinx_mapping`` in ``conf.py``
keeps those base URLs; only the inventory is local).

To link a new object: add it to ``OBJECTS`` below, run

    python docs/scripts/make_inventories.py

and commit the changed ``.inv`` files. The format is Sphinx's version-2
inventory (a four-line header, then zlib-compressed lines
``name domain:role priority uri dispname``); the script reads every file back
with Sphinx's own loader to check it.
"""

from __future__ import annotations

import io
import posixpath
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "_inventories"

# name -> (project title, version, base URL, [(name, domain:role, uri, display name)])
# In a uri here, "$" stands for the object's name; render() writes it out in full
# (Sphinx itself only expands a trailing "$"). "-" as the display name means "the
# name itself".
OBJECTS: dict[str, tuple[str, str, str, list[tuple[str, str, str, str]]]] = {
    "numpy": (
        "NumPy",
        "2.4",
        "https://numpy.org/doc/stable/",
        [
            ("numpy.ndarray", "py:class", "reference/generated/$.html#$", "-"),
            ("numpy.einsum", "py:function", "reference/generated/$.html#$", "-"),
            ("numpy.var", "py:function", "reference/generated/$.html#$", "-"),
            ("numpy.mean", "py:function", "reference/generated/$.html#$", "-"),
            ("numpy.asarray", "py:function", "reference/generated/$.html#$", "-"),
            ("numpy.random.default_rng", "py:function", "reference/random/generator.html#$", "-"),
        ],
    ),
    "torch": (
        "PyTorch",
        "2.13",
        "https://docs.pytorch.org/docs/stable/",
        [
            ("torch.Tensor", "py:class", "tensors.html#$", "-"),
            ("torch.dtype", "py:class", "tensor_attributes.html#$", "-"),
            ("torch.device", "py:class", "tensor_attributes.html#$", "-"),
            ("torch.nn.functional.batch_norm", "py:function", "generated/$.html#$", "-"),
            ("torch.nn.BatchNorm1d", "py:class", "generated/$.html#$", "-"),
            ("torch.nn.BatchNorm2d", "py:class", "generated/$.html#$", "-"),
            ("torch.nn.BatchNorm3d", "py:class", "generated/$.html#$", "-"),
            ("torch.nn.SyncBatchNorm", "py:class", "generated/$.html#$", "-"),
            # The same classes under their defining module, which is how autodoc names the
            # bases of anybn.torch's modules ("Bases: torch.nn.modules.batchnorm.BatchNorm2d").
            *(
                (
                    f"torch.nn.modules.batchnorm.BatchNorm{d}d",
                    "py:class",
                    f"generated/torch.nn.BatchNorm{d}d.html#torch.nn.BatchNorm{d}d",
                    f"torch.nn.BatchNorm{d}d",
                )
                for d in (1, 2, 3)
            ),
            ("torch.nn.Module", "py:class", "generated/$.html#$", "-"),
            # the base class of anybn.torch.FrozenBatchNorm, under the name autodoc shows
            ("torch.nn.modules.module.Module", "py:class",
             "generated/torch.nn.Module.html#torch.nn.Module", "torch.nn.Module"),
            ("torch.autograd.Function", "py:class", "generated/$.html#$", "-"),
            ("torch.cuda.is_available", "py:function", "generated/$.html#$", "-"),
            ("torch.autocast", "py:class", "amp.html#$", "-"),
        ],
    ),
    "cupy": (
        "CuPy",
        "14",
        "https://docs.cupy.dev/en/stable/",
        [
            ("cupy.ndarray", "py:class", "reference/generated/$.html#$", "-"),
            ("cupy.asarray", "py:function", "reference/generated/$.html#$", "-"),
            ("cupy.asnumpy", "py:function", "reference/generated/$.html#$", "-"),
            ("cupy.cuda.Device", "py:class", "reference/generated/$.html#$", "-"),
        ],
    ),
    "array-api": (
        "Python array API standard",
        "2024.12",
        "https://data-apis.org/array-api/latest/",
        [
            ("array_api.mean", "py:function", "API_specification/generated/$.html#$", "-"),
            ("array_api.var", "py:function", "API_specification/generated/$.html#$", "-"),
            ("array_api.sum", "py:function", "API_specification/generated/$.html#$", "-"),
            ("array_api.vecdot", "py:function", "API_specification/generated/$.html#$", "-"),
            (
                "API_specification/index",
                "std:doc",
                "API_specification/index.html",
                "API specification",
            ),
            (
                "design_topics/device_support",
                "std:doc",
                "design_topics/device_support.html",
                "Device support",
            ),
            (
                "device-support",
                "std:label",
                "design_topics/device_support.html#$",
                "Device support",
            ),
            ("purpose_and_scope", "std:doc", "purpose_and_scope.html", "Purpose and scope"),
        ],
    ),
}


def render(project: str, version: str, objects: list[tuple[str, str, str, str]]) -> bytes:
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    ).encode()
    lines = "".join(
        f"{name} {role} {1 if role.startswith('py:') else -1} {uri.replace('$', name)} {disp}\n"
        for name, role, uri, disp in objects
    )
    return header + zlib.compress(lines.encode())


def main() -> None:
    from sphinx.util.inventory import InventoryFile

    OUT.mkdir(exist_ok=True)
    for key, (project, version, base, objects) in OBJECTS.items():
        data = render(project, version, objects)
        path = OUT / f"{key}.inv"
        path.write_bytes(data)
        # Read it back the way intersphinx will, and check every object is there.
        if hasattr(InventoryFile, "loads"):  # Sphinx >= 8.2
            inv = InventoryFile.loads(data, uri=base).data
        else:  # older Sphinx: a dict of domain -> {name: item}
            inv = InventoryFile.load(io.BytesIO(data), base, posixpath.join)
        loaded = {name for domain in inv.values() for name in domain}
        missing = {name for name, *_ in objects} - loaded
        assert not missing, f"{path.name}: not loadable: {sorted(missing)}"
        print(f"wrote {path.relative_to(HERE.parent.parent)} ({len(objects)} objects, {base})")


if __name__ == "__main__":
    main()
