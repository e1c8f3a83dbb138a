import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracle.py
warnings.filterwarnings("ignore", message="Failed to load CPU gemm_4bit_forward")

# Triton kernels run on CPU tensors only in Triton's interpreter, which `triton.jit` chooses when
# the decorator runs, for triton.language's own helpers too: set it before anything imports Triton
# (bitsandbytes does, on import). Without a GPU there is no other way to run them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import qdora  # noqa: E402,F401  (silences bitsandbytes' import-time warning before tests import it)

# fp32 compute against the fp64 oracle. Source: fp32 unit roundoff 6e-8 times the accumulation
# length (in <= 1151 terms, T <= 64 tokens) gives a worst-case relative bound of ~7e-5 and a
# statistical one of ~2e-6; measured worst case over this suite is ~3e-6. Errors are taken
# relative to the largest reference entry, so near-zero entries do not blow up.
FP32_TOL = 3e-5
# bf16 storage/compute: unit roundoff 3.9e-3, a few roundings deep.
BF16_TOL = 3e-2


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual - expected).abs().max() / scale).item()


def assert_close(actual, expected, tol, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = max_rel_err(actual, expected)
    assert err <= tol, f"{what}: max error {err:.3e} (relative to max |ref|) exceeds {tol:.1e}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def sdpa_calls(monkeypatch):
    """`(query length, whether a mask was given)` of every `scaled_dot_product_attention` call in the test."""
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spied(query, key, value, attn_mask=None, *args, **kwargs):
        seen.append((query.shape[-2], attn_mask is not None))
        return original(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spied)
    return seen
