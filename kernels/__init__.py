"""Compute kernels behind `qdora.QDoRALinear` (installed as `qdora.kernels`)."""

if __name__ != "qdora.kernels":
    # With the repository root on sys.path (the working directory of `python -c` or `python -m`),
    # `import kernels` finds this folder. transformers and bitsandbytes probe for the unrelated PyPI
    # package `kernels` that way. Look like an empty namespace folder (no names, no __file__), which
    # both treat as "not installed", and import nothing.
    del __file__
else:
    from qdora.kernels.nf4 import NF4_CODE, dequantize_nf4, dequantize_nf4_reference
    from qdora.kernels.ops import NF4Weight, dora_epilogue_, dora_epilogue_backward, nf4_norm_terms

    __all__ = ["NF4_CODE", "NF4Weight", "dequantize_nf4", "dequantize_nf4_reference", "dora_epilogue_",
               "dora_epilogue_backward", "nf4_norm_terms"]
