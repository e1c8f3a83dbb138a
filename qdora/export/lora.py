"""A trained adapter as a plain LoRA adapter that multi-LoRA servers load beside one shared base.

vLLM, SGLang, TGI, LoRAX and llama.cpp serve LoRA (`lora_B·lora_A`), not DoRA, and not a trained
magnitude. Every method here changes each adapted weight by an exact `ΔW = W' − W0` (`W'` the
merged weight, `qdora.export.merge.merged_weight`; `W0` the base the adapter was trained on, NF4
dequantized or bf16). `extract_lora` takes that change layer by layer, in fp32, and keeps its best
rank-k approximation (the truncated SVD, Eckart–Young): `lora_B = U_k·√S_k`, `lora_A = √S_k·V_kᵀ`,
scaling 1 (`lora_alpha = r`). For LoRA and QLoRA `ΔW = s·B·A` has rank r, so rank r is exact; for
DoRA the magnitude term `(m/n − 1)·W0` is full-rank but small. One layer's `ΔW` (and its base) is
built at a time: the model's weights are never held twice.

The rank is `rank` for every layer, or per layer the smallest that keeps `energy` of `‖ΔW‖²`
(the sum of the squared singular values kept), at most `max_rank`; different ranks go into PEFT's
`rank_pattern` (with `alpha_pattern` keeping every scaling 1). Above `EXACT_BELOW` columns the SVD
is randomized (`torch.svd_lowrank`: `oversample` extra columns, `niter` power iterations; its
accuracy against the exact SVD is measured in docs/deploy.md).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from qdora.core.layer import QDoRALinear
from qdora.core.safetensors_io import atomic_dir, check_finite, output_folder, save_file_atomic, write_text_atomic
from qdora.export.drift import adapter_effect, adapters_disabled, compare, token_groups
from qdora.export.merge import merged_weight
from qdora.models.adapter_save import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS, adapter_layers, peft_lora_config
from qdora.models.loading import load_model
from qdora.models.moe import file_expert_count

VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's `--max-lora-rank` takes; an adapter's ranks must not exceed it. vLLM reads `r`
and `lora_alpha` only (one scaling `lora_alpha / r` for every layer, each layer's rank from its
tensors): here every layer's scaling is 1, so per-layer ranks are served right there too."""

EXACT_BELOW = 1024
"""Layers whose smaller side is below this take the exact SVD; larger ones the randomized one."""


@dataclasses.dataclass
class LoraExtraction:
    """The extracted adapter: per layer `lora_A (k, in)` and `lora_B (out, k)` (scaling 1), the rank
    `k`, the share of `‖ΔW‖²` kept, and `‖ΔW‖` itself; `seconds` of extraction."""
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    ranks: dict[str, int]
    kept: dict[str, float]
    norms: dict[str, float]
    seconds: float = 0.0

    def summary(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        shown = f"r={ranks[0]}" if len(ranks) == 1 else f"r {ranks[0]}..{ranks[-1]} (per layer)"
        kept = sorted(self.kept.values())
        return (f"{len(self.ranks)} layers, {shown}, energy kept: median {kept[len(kept) // 2]:.4f}, "
                f"min {kept[0]:.4f}; {self.seconds:.1f} s")

    def vllm_max_lora_rank(self) -> int | None:
        """The smallest vLLM `--max-lora-rank` that serves this adapter (None: above vLLM's largest)."""
        return next((k for k in VLLM_MAX_LORA_RANKS if k >= max(self.ranks.values())), None)


def layer_delta(layer: QDoRALinear) -> torch.Tensor:
    """`ΔW = W' − W0` of one adapted layer, `(out, in)` fp32 on the CPU."""
    delta = merged_weight(layer, torch.float32)
    delta -= layer.dequantized_base(torch.float32).cpu()
    return delta


def truncated_svd(delta: torch.Tensor, k: int, oversample: int = 16, niter: int = 4,
                  exact: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-`k` singular triplets `(U (out, k), S (k,), V (in, k))` of `delta`: exact below
    `EXACT_BELOW` (or with `exact`), else randomized with `oversample` extra columns and `niter`
    power iterations."""
    side = min(delta.shape)
    if exact if exact is not None else side < EXACT_BELOW:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k].T
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the sketch is random: the same adapter extracts to the same file
    try:
        U, S, V = torch.svd_lowrank(delta, q=min(side, k + oversample), niter=niter)
    finally:
        torch.random.set_rng_state(generator_state)
    return U[:, :k], S[:k], V[:, :k]


def _rank_for(S: torch.Tensor, total: float, energy: float, cap: int) -> int:
    """The smallest k with sum(S[:k]²) >= energy·total, at most `cap` (at least 1); all of `cap`
    for energy 1 (rounding must not drop the last components)."""
    if energy >= 1:
        return cap
    cumulative = torch.cumsum(S.double() ** 2, 0)
    reached = torch.nonzero(cumulative >= energy * total)
    return max(1, min(cap, int(reached[0]) + 1 if len(reached) else cap))


def check_ranks(sides: dict[str, int], rank: int | None, energy: float | None, max_rank: int | None) -> None:
    """Refuse, in one line before any work, a rank no layer can take. `sides`: module -> min(out, in)."""
    if (rank is None) == (energy is None):
        raise ValueError("give --rank K or --energy F (one of them)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"--rank {rank} must be a positive integer")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"--energy {energy} must be in (0, 1] (the share of each layer's ‖ΔW‖² kept, e.g. 0.9)")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"--max-rank {max_rank} must be a positive integer")
    if rank is not None and max_rank is not None:
        raise ValueError("--max-rank caps --energy's per-layer ranks; with --rank it does not apply")
    if rank is not None and sides:  # --max-rank is a cap: a layer smaller than it takes its full rank
        name = min(sides, key=sides.get)
        if rank > sides[name]:
            raise ValueError(f"--rank {rank} exceeds {name}'s smaller side ({sides[name]}); use at most "
                             f"{sides[name]}, or --energy with --max-rank")


@torch.no_grad()
def check_experts(names) -> None:
    """Refuse an adapter on an MoE's experts (module names `...experts.<projection>.<e>`): a served LoRA
    has one rank per module, and vLLM and llama.cpp do not load per-expert LoRA from these files."""
    if file_expert_count(names) is not None:
        raise ValueError("this adapter adapts an MoE's experts: LoRA extraction writes per-module LoRA that "
                         "servers do not load for experts; merge it instead (--format safetensors or nf4)")


def extract_lora(model: nn.Module, rank: int | None = None, energy: float | None = None,
                 max_rank: int | None = None, oversample: int = 16, niter: int = 4, exact: bool | None = None,
                 progress: bool = False) -> LoraExtraction:
    """The model's adapters as a LoRA of rank `rank` (or per layer by `energy`, capped by
    `max_rank`, default 64): see the module docstring."""
    layers = adapter_layers(model)
    check_experts(layers)
    cfg = getattr(model, "qdora_config", None)
    if cfg is not None and cfg.method == "full":
        raise ValueError("a full fine-tune has no adapter to extract a LoRA from; merge it instead")
    if not layers:
        raise ValueError("the model has no qdora adapters; load an adapter (qdora.load_adapter) first")
    check_ranks({n: min(m.in_features, m.out_features) for n, m in layers.items()}, rank, energy, max_rank)
    cap = rank if rank is not None else max_rank or 64
    out = LoraExtraction({}, {}, {}, {}, {})
    start = time.perf_counter()
    items = list(layers.items())
    if progress:
        from tqdm.auto import tqdm  # the progress bar, only when asked for
        items = tqdm(items, desc="extracting LoRA", unit="layer")
    for name, layer in items:
        delta = layer_delta(layer)
        total = delta.double().pow(2).sum().item()
        k = min(cap, min(delta.shape))
        U, S, V = truncated_svd(delta, k, oversample, niter, exact)
        if energy is not None:
            k = _rank_for(S, total, energy, k)
            U, S, V = U[:, :k], S[:k], V[:, :k]
        root = S.sqrt()
        out.B[name] = (U * root).contiguous()
        out.A[name] = (root[:, None] * V.T).contiguous()
        for attr, t in (("lora_A", out.A[name]), ("lora_B", out.B[name])):
            check_finite(f"{name}.{attr}", t)
        out.ranks[name] = k
        out.kept[name] = (S.double().pow(2).sum().item() / total) if total > 0 else 1.0
        out.norms[name] = total ** 0.5
        del delta
    out.seconds = time.perf_counter() - start
    return out


def peft_config(extraction: LoraExtraction, base_model_name_or_path: str | None = None) -> dict:
    """PEFT's `adapter_config.json` for the extraction: plain LoRA (`use_dora` false), scaling 1
    (`lora_alpha = r`), the modules' short names as `target_modules`, and the ranks that differ
    from the most common one in `rank_pattern` (with the same `alpha_pattern`)."""
    ranks = extraction.ranks
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: k for name, k in sorted(ranks.items()) if k != r}
    return peft_lora_config(r, r, sorted({name.rsplit(".", 1)[-1] for name in ranks}), base_model_name_or_path,
                            rank_pattern=pattern, alpha_pattern=dict(pattern))


def save_lora(extraction: LoraExtraction, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
              base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
    """Write the extraction as a PEFT LoRA adapter folder (`adapter_config.json`,
    `adapter_model.safetensors`), built under a temporary name and renamed into place."""
    out_dir = output_folder(out_dir, overwrite)
    tensors = {}
    for name in extraction.ranks:
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = extraction.A[name].to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = extraction.B[name].to(dtype).contiguous()
    with atomic_dir(out_dir) as tmp:
        save_file_atomic(tensors, tmp / PEFT_WEIGHTS, {"format": "pt"})
        config = peft_config(extraction, base_model_name_or_path)
        write_text_atomic(tmp / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")
        write_text_atomic(tmp / "extraction.json", json.dumps(
            {"ranks": extraction.ranks, "energy_kept": extraction.kept, "delta_norm": extraction.norms,
             "seconds": extraction.seconds}, indent=1) + "\n")
    return out_dir


def adapter_sides(fmt: str, meta: dict, modules: dict) -> dict[str, int]:
    """module -> min(out, in), from an adapter file as `qdora.models.adapter_io.read_adapter` gives it
    (so that a rank is checked before the model is loaded)."""
    if fmt == "qdora":
        return {n: min(m["in_features"], m["out_features"]) for n, m in meta.get("modules", {}).items()}
    return {n: min(t["lora_A"].shape[1], t["lora_B"].shape[0]) for n, t in modules.items()
            if "lora_A" in t and "lora_B" in t}


def lora_drift_report(model: nn.Module, tokenizer, lora_dir: str | os.PathLike, base_path: str | os.PathLike,
                      texts: list[str] | None = None) -> dict:
    """`--check` for an extracted LoRA, served through `peft.PeftModel.from_pretrained` as engines
    read it: the adapted model against the LoRA on the base it was trained on (`adapted`: the same
    NF4 base, or the plain one for lora/dora) and on the original checkpoint in fp32 (`original`),
    beside the adapter's own effect and the floor the original base alone costs (`base`: the
    unadapted trained base against the original checkpoint)."""
    import peft  # optional (the `peft` extra): --check serves the LoRA as PEFT does
    from transformers import AutoModelForCausalLM  # heavy, used here only

    groups = token_groups(tokenizer, texts)
    cfg = model.qdora_config
    was_training = model.training
    model.eval()
    try:
        trained_base, _ = load_model(base_path, method=cfg.method, cfg=cfg, add=False, progress=False)
        served = peft.PeftModel.from_pretrained(trained_base, lora_dir).eval()
        report = {"format": "lora", "adapted": compare(model, served, groups),
                  "adapter": adapter_effect(model, groups)}
        del served, trained_base
        original = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
        with adapters_disabled(model):
            report["base"] = compare(model, original, groups)
        report["original"] = compare(model, peft.PeftModel.from_pretrained(original, lora_dir).eval(), groups)
    finally:
        model.train(was_training)
    return report


GGUF_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def save_gguf_lora(extraction: LoraExtraction, config, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                   overwrite: bool = False, file_name: str = "lora.gguf") -> Path:
    """Write the extraction as llama.cpp's LoRA GGUF (what its `convert_lora_to_gguf.py` writes and
    `llama-cli --lora` reads), Llama family: `general.type` "adapter", `adapter.type` "lora",
    `adapter.lora.alpha`; per base tensor (its GGUF name, e.g. `blk.0.attn_q.weight`) a `.lora_a`
    `(k, in)` and a `.lora_b` `(out, k)`, q and k projections' `lora_b` rows permuted as their
    weights are (`qdora.export.gguf.permute_qk`). llama.cpp scales a layer by alpha / its rank, so
    alpha is the most common rank and a layer of another rank carries the difference in `lora_b`."""
    from qdora.export.gguf import check_config, gguf_package, permute_qk  # the gguf package is optional
    gguf = gguf_package()
    check_config(config)
    if dtype not in GGUF_TYPES:
        raise ValueError(f"dtype {dtype} cannot be written to a LoRA GGUF; use float32, float16 or bfloat16")
    kind = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[dtype])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    alpha = collections.Counter(extraction.ranks.values()).most_common(1)[0][0]
    out_dir = output_folder(out_dir, overwrite)
    tensors = []
    for module, k in extraction.ranks.items():
        name = names.get_name(module)
        if name is None:
            raise ValueError(f"{module} has no GGUF name in the gguf package's Llama map")
        B = extraction.B[module] * (k / alpha)
        if module.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            heads = config.num_attention_heads if module.endswith("q_proj") else config.num_key_value_heads
            B = permute_qk(B, heads)
        tensors += [(f"{name}.weight.lora_a", extraction.A[module]), (f"{name}.weight.lora_b", B)]
    with atomic_dir(out_dir) as tmp:
        writer = gguf.GGUFWriter(tmp / file_name, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
            for key, t in tensors:
                check_finite(key, t)
                data = t.detach().to(torch.float32).contiguous().numpy()
                if kind != gguf.GGMLQuantizationType.F32:
                    data = gguf.quants.quantize(data, kind)
                writer.add_tensor(key, data, raw_dtype=kind)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out_dir / file_name
