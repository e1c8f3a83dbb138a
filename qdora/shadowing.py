"""Hand a top-level name back to the distribution that owns it.

The repository's folders `kernels/` and `eval/` install as `qdora.kernels` and `qdora.eval`
(pyproject.toml). Python run from the repository root (`python -c`, `python -m`, the REPL) puts the
root first on `sys.path`, so `import kernels` would find the folder instead of the PyPI distribution
`kernels`, which transformers (5.25 and later) and bitsandbytes import. Each folder's `__init__`
calls `hand_over` when it is imported under its bare name: the installed module of that name takes
its place in `sys.modules` (the import system returns whatever a module leaves there), or, with none
installed, the import fails as it would without the folder. Standard library only: this runs while
another package may be half-way through importing.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(name: str, folder: str) -> None:
    """Replace the module being imported as `name` (the repository folder `folder`) with the module of
    that name found on `sys.path` outside the folder's parent, or raise ModuleNotFoundError."""
    root = os.path.realpath(os.path.dirname(os.path.abspath(folder)))
    elsewhere = [p for p in sys.path if os.path.realpath(os.path.abspath(p or os.curdir)) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None:
        del sys.modules[name]
        raise ModuleNotFoundError(f"No module named {name!r} (the repository folder {folder} is "
                                  f"qdora.{name}, not {name})", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
