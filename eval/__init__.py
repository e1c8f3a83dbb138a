"""Benchmarks and the method-comparison harness (installed as `qdora.eval`)."""

if __name__ != "qdora.eval":
    del __file__  # not a top-level package; see kernels/__init__.py
