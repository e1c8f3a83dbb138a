"""The core: what one adapted layer is and computes, and the files everything else writes.

Owns the adapter settings (`config`), NF4 quantization in bitsandbytes' format (`nf4`), the
factored DoRA forward and backward (`function`), the adapted linear layer `QDoRALinear` (`layer`)
and its shared dropout (`dropout`), the LM head's cross-entropy over chunks of tokens (`loss`), fp32
master copies for bf16 adapters (`optim`), and atomic, finite-checked safetensors/JSON writing
(`safetensors_io`). It may import only torch, bitsandbytes and `qdora.kernels`; every other wing
builds on it.
"""
