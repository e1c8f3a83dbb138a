"""Compute kernels behind `qdora.QDoRALinear` (installed as `qdora.kernels`)."""

if __name__ == "kernels":
    # Imported by its bare name from the repository root, where `kernels` is the PyPI distribution
    # that transformers and bitsandbytes import: hand the name over to it (qdora/shadowing.py).
    from qdora.shadowing import hand_over

    hand_over(__name__, __path__[0])
else:
    from qdora.kernels.nf4 import NF4_CODE, dequantize_nf4, dequantize_nf4_reference
    from qdora.kernels.ops import NF4Weight, dora_epilogue_, dora_epilogue_backward, nf4_norm_terms

    __all__ = ["NF4_CODE", "NF4Weight", "dequantize_nf4", "dequantize_nf4_reference", "dora_epilogue_",
               "dora_epilogue_backward", "nf4_norm_terms"]
