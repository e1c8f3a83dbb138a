"""Compute kernels behind `qdora.QDoRALinear` (installed as `qdora.kernels`)."""

if __name__ == "kernels":
    # Imported by its bare name: Python runs from the repository root (`python -c`, `python -m`), which
    # it puts first on sys.path, and `kernels` is the PyPI distribution that transformers (5.25 and
    # later) and bitsandbytes import. Hand the name over to the module of that name found elsewhere on
    # sys.path (the import system returns whatever a module leaves in sys.modules). Standard library
    # only: plain transformers must not import qdora.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.realpath(_os.path.dirname(__path__[0]))
    _spec = _machinery.PathFinder.find_spec(__name__, [p for p in _sys.path if _os.path.realpath(p or ".") != _root])
    if _spec is None:
        # None installed: look like an empty namespace folder (no __file__, no names, no submodules),
        # which transformers (before 5.25 it imports the name when no metadata is found) and
        # bitsandbytes treat as "not installed".
        del __file__
        __path__ = []
    else:
        _module = _sys.modules[__name__] = _util.module_from_spec(_spec)
        _spec.loader.exec_module(_module)
    del _machinery, _util, _os, _sys, _root, _spec
else:
    from qdora.kernels.nf4 import NF4_CODE, dequantize_nf4, dequantize_nf4_reference
    from qdora.kernels.ops import NF4Weight, dora_epilogue_, dora_epilogue_backward, nf4_norm_terms

    __all__ = ["NF4_CODE", "NF4Weight", "dequantize_nf4", "dequantize_nf4_reference", "dora_epilogue_",
               "dora_epilogue_backward", "nf4_norm_terms"]
