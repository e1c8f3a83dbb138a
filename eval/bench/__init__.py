"""Benchmarks (`qdora bench ...`): the layer, the kernels, loading, a training step, PEFT, memory
measurement (`memory`) and bf16 adapters (`adapter_dtype`). They print figures and assert nothing.
They may import the library and `qdora.eval.common`.
"""
