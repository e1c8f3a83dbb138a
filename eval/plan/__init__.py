"""The planner's validation: its prediction against a measured step (`validate`). It may import the
library, `qdora.eval.common`, the benchmarks and the harness.
"""
