"""Benchmarks and the method-comparison harness (installed as `qdora.eval`)."""
