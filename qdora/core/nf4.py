"""NF4 storage on bitsandbytes: explicit quantization, adoption of `bnb.nn.Linear4bit`, and
row-block access to a frozen base weight (quantized or not) for the adapter math.

Quantization here is always an explicit call (never a side effect of `.to()`), always NF4.
"""

from __future__ import annotations

import math
from typing import Iterator

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from torch import nn

from qdora.core.config import storage_dtype
from qdora.kernels.ops import NF4Weight

# Elements quantized per call: bitsandbytes' CPU quantizer makes ~14 bytes of temporaries per
# element, so an 8B model's largest matrix (58.7M elements) would need ~0.8 GB at once; in chunks
# of 2^20 elements it needs ~15 MB.
QUANT_CHUNK = 1 << 20


def _check_finite(flat: torch.Tensor, chunk: int, row_length: int) -> None:
    """Raise, naming the first (row, column), if `flat` has a non-finite value; `chunk` elements at a
    time (`isfinite` makes ~7 bytes of temporaries per element, all freed on return)."""
    for start in range(0, flat.numel(), chunk):
        finite = torch.isfinite(flat[start:start + chunk])
        if not finite.all():
            first = divmod(start + int((~finite).nonzero()[0]), row_length)
            raise ValueError(f"weight has non-finite values (first at index {list(first)}); cannot quantize")


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 quant_storage="uint8", chunk: int = QUANT_CHUNK) -> tuple[torch.Tensor, bnbF.QuantState]:
    """Quantize a float `(out, in)` weight to NF4. Returns the packed data and its `QuantState`,
    bit for bit what `bitsandbytes.functional.quantize_4bit` returns (so every bnb tool reads it),
    computed `chunk` elements at a time (NF4 blocks are independent; the double quantization of
    the absmax runs once over all of them, as bitsandbytes does)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"expected a float weight, got dtype {weight.dtype}")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        weight = weight.float()
    storage = storage_dtype(quant_storage)
    numel = weight.numel()
    bytes_needed = (numel + 1) // 2
    if bytes_needed % storage.itemsize:
        raise ValueError(
            f"a {tuple(weight.shape)} weight packs into {bytes_needed} bytes, not a whole number of "
            f"{storage} elements; use quant_storage='uint8' for this layer")
    weight = weight.contiguous()
    chunk = max(2 * blocksize, chunk // (2 * blocksize) * (2 * blocksize))  # whole blocks, whole bytes
    flat = weight.view(-1)
    _check_finite(flat, chunk, weight.shape[1])
    if numel <= chunk:
        return bnbF.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
                                  quant_type="nf4", quant_storage=storage)
    packed_parts, absmax_parts = [], []
    for start in range(0, numel, chunk):
        packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(flat[start:start + chunk], blocksize,
                                                                      "nf4", torch.uint8)
        packed_parts.append(packed.view(-1))
        absmax_parts.append(absmax)
    packed = torch.cat(packed_parts)
    absmax = torch.cat(absmax_parts)
    del packed_parts, absmax_parts
    packed = (packed if storage == torch.uint8 else packed.view(storage)).unsqueeze(1)
    code = bnbF.get_4bit_type("nf4", device=weight.device)
    if not double_quant:
        return packed, bnbF.QuantState(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                                       code=code, quant_type="nf4")
    offset = absmax.mean()
    qabsmax, state2 = bnbF.quantize_blockwise(absmax - offset, blocksize=256)
    return packed, bnbF.QuantState(absmax=qabsmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                                   code=code, quant_type="nf4", offset=offset, state2=state2)


def linear4bit_from_linear(linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                           quant_storage="uint8") -> bnb.nn.Linear4bit:
    """Build a quantized `bnb.nn.Linear4bit` from an `nn.Linear`, quantizing explicitly.
    The bias is kept as it is (same dtype, same values)."""
    return linear4bit_from_weight(linear.weight.detach(), linear.bias, blocksize, double_quant, quant_storage)


def linear4bit_from_weight(weight: torch.Tensor, bias: torch.Tensor | None = None, blocksize: int = 64,
                           double_quant: bool = True, quant_storage="uint8",
                           has_bias: bool | None = None, compute_dtype: torch.dtype | None = None,
                           ) -> bnb.nn.Linear4bit:
    """A quantized `bnb.nn.Linear4bit` holding `weight` `(out, in)` in NF4. With `has_bias=True` and
    no `bias`, the bias stays on the meta device until it is assigned (streaming loads).
    `compute_dtype` is what bitsandbytes' own forward uses (layers without an adapter): by default
    fp32 for a CPU weight (bf16 matmuls are very slow on most CPUs), else the weight's dtype."""
    if compute_dtype is None:
        compute_dtype = torch.float32 if weight.device.type == "cpu" else weight.dtype
    packed, state = quantize_nf4(weight, blocksize, double_quant, quant_storage)
    # bitsandbytes dequantizes to state.dtype in its own forward: make that the compute dtype, so a
    # bf16 checkpoint's frozen layers are not rounded to bf16 again on a CPU computing in fp32.
    state.dtype = compute_dtype
    storage = storage_dtype(quant_storage)
    out_f, in_f = weight.shape
    has_bias = bias is not None if has_bias is None else has_bias
    with torch.device("meta"):
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=double_quant, quant_type="nf4", quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type="nf4",
                                     quant_storage=storage, module=layer, bnb_quantized=True)
    layer.quant_state = state
    _keep_standard_layout(layer)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


def quant_state_tensors(state: bnbF.QuantState) -> list[torch.Tensor]:
    """The tensors a bitsandbytes `QuantState` holds: absmax, code book, and with double
    quantization the absmax offset and the second level's absmax and code book."""
    out = [state.absmax, state.code]
    if state.offset is not None:
        out.append(state.offset)
    if state.state2 is not None:
        out += [state.state2.absmax, state.state2.code]
    return out


def _keep_standard_layout(layer: bnb.nn.Linear4bit) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes' eval-mode forward repacks the weight in place into a
    CPU-only layout and computes in bf16 from then on (measured: 2.7e-3 abs error on a 224x64 layer,
    sticky in train mode too). Turn that off: the weight stays in the bitsandbytes format that
    qdora, PEFT and serialization read, and compute stays in `compute_dtype`."""
    layer.support_avx512bf16_for_cpu = False


def is_repacked(layer: bnb.nn.Linear4bit) -> bool:
    """True if bitsandbytes repacked this layer's weight for its AVX512-BF16 CPU kernel."""
    state = getattr(layer.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def repacked_message(names: list[str]) -> str:
    """Why a repacked layer is refused, and the way out (one text for every place that refuses)."""
    return (f"{len(names)} bnb.nn.Linear4bit layer(s) (e.g. {names[0]}) were repacked by bitsandbytes "
            f"{bnb.__version__} for its AVX512-BF16 CPU kernel at an eval-mode forward, which rounds their NF4 "
            "scales to bf16: their original weights cannot be recovered exactly. Load the model again and call "
            "qdora.keep_standard_layout(model) right after loading it (or add the adapters before any "
            "eval-mode forward)")


def keep_standard_layout(model: nn.Module) -> int:
    """Keep every `bnb.nn.Linear4bit` of `model` in the standard NF4 layout: bitsandbytes would
    otherwise repack the weights in place at the first eval-mode forward on a CPU with AVX512-BF16,
    rounding their scales to bf16 (lossy, and PEFT's DoRA then misreads them). Call it right after
    `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`. Returns the number of
    layers; raises if some were already repacked."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    repacked = [name for name, m in layers.items() if is_repacked(m)]
    if repacked:
        raise ValueError(repacked_message(repacked))
    for m in layers.values():
        _keep_standard_layout(m)
    return len(layers)


def adopt_linear4bit(layer: bnb.nn.Linear4bit, name: str = "Linear4bit") -> bnb.nn.Linear4bit:
    """Check that a `bnb.nn.Linear4bit` holds an NF4 weight this library can read, and return it
    unchanged (no re-quantization). A layer whose weight was never quantized (bitsandbytes
    quantizes on `.to(device)`) is quantized here, explicitly, with its own settings. A layer that
    bitsandbytes repacked for its CPU kernel is refused: its scales were rounded to bf16."""
    weight = layer.weight
    if not isinstance(weight, bnb.nn.Params4bit):
        raise TypeError(f"{type(layer).__name__}.weight is a {type(weight).__name__}, not a Params4bit")
    if weight.quant_type != "nf4":
        raise ValueError(f"Linear4bit uses quant_type={weight.quant_type!r}; qdora needs 'nf4' "
                         "(pass quant_type='nf4', or bnb_4bit_quant_type='nf4' in BitsAndBytesConfig)")
    if weight.device.type == "meta":
        raise ValueError("Linear4bit weight is on the meta device: load its weights first")
    if not weight.bnb_quantized:
        weight._quantize(weight.device)
        layer.quant_state = weight.quant_state
    if is_repacked(layer):
        raise ValueError(repacked_message([name]))
    _keep_standard_layout(layer)
    return layer


class RowBlocks:
    """Row-block reader over a frozen base weight of shape `(out, in)`.

    `blocks(dtype)` yields `(r0, r1, W0[r0:r1])` in `dtype`. For an NF4 weight each block is
    dequantized from the packed data (double-quantized absmax included) into a fresh buffer;
    only `block_rows × in` values exist at once. For a plain tensor, a block is a view when the
    dtype already matches (no copy), otherwise a converted copy.
    """

    def __init__(self, module: nn.Module, block_rows: int):
        self.module = module
        self.quantized = isinstance(module, bnb.nn.Linear4bit)
        if self.quantized:
            if module.weight.device.type != "meta":  # meta: a structure to be filled (qdora.train.fsdp)
                adopt_linear4bit(module)
            shape = tuple(self.state.shape)
        else:
            shape = tuple(module.weight.shape)
        if len(shape) != 2:
            raise ValueError(f"expected a 2-D base weight, got shape {shape}")
        self.out_features, self.in_features = shape
        self.block_rows = block_rows
        if self.quantized:
            bs = self.state.blocksize
            # Rows per step so that each row block starts on an NF4 block boundary.
            self.row_align = bs // math.gcd(self.in_features, bs)
        else:
            self.row_align = 1

    @property
    def state(self) -> bnbF.QuantState:
        # A sharded model (qdora.train.fsdp) keeps the state on the module: its weight is a plain tensor.
        state = getattr(self.module.weight, "quant_state", None)
        return state if state is not None else self.module.quant_state

    def step(self, block_rows: int | None = None) -> int:
        rows = block_rows or self.block_rows
        return max(self.row_align, (rows // self.row_align) * self.row_align)

    @property
    def nf4(self) -> NF4Weight:
        """The packed weight as the kernel ops take it (read afresh: FSDP may swap the data)."""
        return NF4Weight.from_quant_state(self.module.weight.data, self.state)

    def rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """`W0[r0:r1]` in `dtype`; `r0` must be a multiple of `row_align`."""
        if not self.quantized:
            block = self.module.weight[r0:r1]
            return block if block.dtype == dtype else block.to(dtype)
        if r0 % self.row_align:
            raise ValueError(f"row block start {r0} is not a multiple of {self.row_align}")
        return self.nf4.rows(r0, r1, dtype)

    def owns_blocks(self, dtype: torch.dtype) -> bool:
        """True if `rows()` returns fresh buffers that may be modified in place."""
        return self.quantized or self.module.weight.dtype != dtype

    def blocks(self, dtype: torch.dtype, block_rows: int | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        if not self.quantized and self.module.weight.dtype == dtype:
            yield 0, self.out_features, self.module.weight  # a view costs nothing: one block
            return
        step = self.step(block_rows)
        for r0 in range(0, self.out_features, step):
            r1 = min(self.out_features, r0 + step)
            yield r0, r1, self.rows(r0, r1, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight (for tests and small layers only)."""
        return torch.cat([b for _, _, b in self.blocks(dtype)]) if self.out_features else \
            torch.empty(0, self.in_features, dtype=dtype)

    def row_sq_norms(self) -> torch.Tensor:
        """`c = rowsum(W0 ⊙ W0)` in fp32, one pass over the weight."""
        return self.norm_terms(None)[1]

    def norm_terms(self, A: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(P, c) = (W0·Aᵀ, rowsum(W0²))` in fp32. NF4: one pass over the packed data with no
        dequantized weight in memory (`torch.ops.qdora.nf4_norm_terms`); plain: block by block.
        A meta weight (a structure to be filled, `qdora.train.fsdp`) gives meta results."""
        r = 0 if A is None else A.shape[0]
        if self.device.type == "meta":
            return (torch.empty(self.out_features, r, dtype=torch.float32, device="meta"),
                    torch.empty(self.out_features, dtype=torch.float32, device="meta"))
        if self.quantized:
            return self.nf4.norm_terms(A)
        P = torch.empty(self.out_features, r, dtype=torch.float32, device=self.device)
        c = torch.empty(self.out_features, dtype=torch.float32, device=self.device)
        A32 = None if A is None else A.float()
        for r0, r1, block in self.blocks(torch.float32):
            c[r0:r1] = block.pow(2).sum(1)
            if r:
                P[r0:r1] = block @ A32.t()
        return P, c

    @property
    def device(self) -> torch.device:
        return self.module.weight.device
