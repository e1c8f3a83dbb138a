"""Benchmarks and the method-comparison harness (installed as `qdora.eval`)."""

if __name__ == "eval":
    # Imported by its bare name from the repository root: hand the name over to any installed module
    # of that name (see kernels/__init__.py).
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.realpath(_os.path.dirname(__path__[0]))
    _spec = _machinery.PathFinder.find_spec(__name__, [p for p in _sys.path if _os.path.realpath(p or ".") != _root])
    if _spec is None:  # none installed: an empty namespace folder, as for kernels
        del __file__
        __path__ = []
    else:
        _module = _sys.modules[__name__] = _util.module_from_spec(_spec)
        _spec.loader.exec_module(_module)
    del _machinery, _util, _os, _sys, _root, _spec
