"""The dimensions of a Llama-architecture model that memory depends on: from a checkpoint's
config.json, or a preset of the published configurations. A mixture-of-experts model (Qwen2/3-MoE,
OLMoE, Mixtral: transformers' fused `experts.gate_up_proj (E, 2I, H)` and `experts.down_proj (E, H, I)`
with a router `mlp.gate (E, H)`) has `num_experts` > 0."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-architecture model that memory depends on (an MoE: `num_experts` > 0)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    head_dim: int = 0
    """0: hidden // heads."""
    qk_norm: str = ""
    """RMSNorm on queries and keys: "" none, "head" per head (Qwen3: head_dim weights each), "full" over
    the whole projection (OLMoE: q and kv weights)."""
    num_experts: int = 0
    """Routed experts per MoE layer, E (0: a dense model)."""
    experts_per_token: int = 0
    """Experts each token is routed to, k."""
    moe_intermediate: int = 0
    """An expert's intermediate size, I (Qwen's `moe_intermediate_size`; Mixtral's and OLMoE's
    `intermediate_size`)."""
    dense_layers: tuple[int, ...] = ()
    """Decoder layers of an MoE with a dense MLP (`intermediate`) instead of experts (Qwen's
    `mlp_only_layers`, `decoder_sparse_step`); the others are MoE layers."""
    shared_experts: int = 0
    """Shared (always-on) experts per MoE layer (Qwen2-MoE, DeepSeek); 0 for the presets."""
    norm_topk: bool = True
    """The top-k routing weights are renormalised to sum to 1 (`norm_topk_prob`; Mixtral always)."""

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def moe(self) -> bool:
        return self.num_experts > 0

    @property
    def moe_layers(self) -> int:
        """Decoder layers whose MLP is routed experts."""
        return self.layers - len(self.dense_layers) if self.moe else 0

    def attention_shapes(self) -> dict[str, tuple[int, int]]:
        """`(out, in)` of each attention linear of one decoder layer."""
        h, q, kv = self.hidden, self.heads * self.hd, self.kv_heads * self.hd
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """`(out, in)` of each linear of one dense decoder layer (of an MoE layer: the attention's)."""
        h, i = self.hidden, self.intermediate
        mlp = {} if self.moe else {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        return {**self.attention_shapes(), **mlp}

    def expert_shapes(self) -> dict[str, tuple[int, int]]:
        """`(out, in)` of one expert's projections (`qdora.core.experts.QDoRAExperts`), by target name."""
        h, i = self.hidden, self.moe_intermediate
        return {"experts.gate_up_proj": (2 * i, h), "experts.down_proj": (h, i)} if self.moe else {}

    def qk_norm_params(self) -> int:
        q, kv = self.heads * self.hd, self.kv_heads * self.hd
        return {"": 0, "head": 2 * self.hd, "full": q + kv}[self.qk_norm]

    def params(self) -> int:
        attn = sum(o * i for o, i in self.attention_shapes().values()) + 2 * self.hidden + self.qk_norm_params()
        h, i = self.hidden, self.intermediate
        dense = 3 * h * i
        routed = self.num_experts * (sum(o * n for o, n in self.expert_shapes().values()) + h)  # + router
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return (self.layers * attn + (self.layers - self.moe_layers) * dense + self.moe_layers * routed
                + self.vocab * self.hidden + head + self.hidden)


# Published configurations (the models' own config.json files on the Hugging Face Hub).
PRESETS = {
    "llama-2-7b": ModelShape("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000, False),
    "llama-2-13b": ModelShape("Llama-2-13B", 5120, 13824, 40, 40, 40, 32000, False),
    "llama-2-70b": ModelShape("Llama-2-70B", 8192, 28672, 80, 64, 8, 32000, False),
    "llama-65b": ModelShape("LLaMA-65B", 8192, 22016, 80, 64, 64, 32000, False),
    "llama-3-8b": ModelShape("Llama-3-8B", 4096, 14336, 32, 32, 8, 128256, False),
    "llama-3-70b": ModelShape("Llama-3-70B", 8192, 28672, 80, 64, 8, 128256, False),
    "smollm2-135m": ModelShape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, True),
    # Mixtures of experts, every layer routed: Qwen/Qwen3-30B-A3B, allenai/OLMoE-1B-7B-0924,
    # mistralai/Mixtral-8x7B-v0.1 (`intermediate` is the config's dense size, unused without dense layers).
    "qwen3-30b-a3b": ModelShape("Qwen3-30B-A3B", 2048, 6144, 48, 32, 4, 151936, False, head_dim=128,
                                qk_norm="head", num_experts=128, experts_per_token=8, moe_intermediate=768),
    "olmoe-1b-7b": ModelShape("OLMoE-1B-7B", 2048, 1024, 16, 16, 16, 50304, False, qk_norm="full",
                              num_experts=64, experts_per_token=8, moe_intermediate=1024, norm_topk=False),
    "mixtral-8x7b": ModelShape("Mixtral-8x7B", 4096, 14336, 32, 32, 8, 32000, False, num_experts=8,
                               experts_per_token=2, moe_intermediate=14336),
}
ALIASES = {"olmoe-1b-7b-0924": "olmoe-1b-7b", "mixtral-8x7b-v0.1": "mixtral-8x7b"}
"""Hub names of the presets, beside their short names."""


QK_NORM = {"qwen3": "head", "qwen3_moe": "head", "olmoe": "full", "olmo2": "full"}
"""Architectures (`model_type`) that normalize queries and keys, and how."""


def shape_from_config(config, name: str = "model") -> ModelShape:
    """A `ModelShape` from a transformers config object or a config.json dict (an MoE's experts from
    `num_experts` or `num_local_experts`, `num_experts_per_tok`, `moe_intermediate_size`)."""
    get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else \
        (lambda k, d=None: getattr(config, k, d))
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if get(k) is None]
    if missing:
        raise ValueError(f"{name}: config lacks {', '.join(missing)}; a Llama-architecture config is expected")
    heads, layers = int(get("num_attention_heads")), int(get("num_hidden_layers"))
    experts = int(get("num_experts") or get("num_local_experts") or get("n_routed_experts") or 0)
    moe = {}
    if experts:
        step = int(get("decoder_sparse_step") or 1)
        only = set(get("mlp_only_layers") or ())
        shared = int(get("n_shared_experts") or (1 if get("shared_expert_intermediate_size") else 0))
        moe = dict(num_experts=experts, experts_per_token=int(get("num_experts_per_tok") or 0),
                   moe_intermediate=int(get("moe_intermediate_size") or get("intermediate_size")),
                   dense_layers=tuple(i for i in range(layers) if i in only or (i + 1) % step), shared_experts=shared,
                   norm_topk=bool(get("norm_topk_prob", True)))
    return ModelShape(name=name, hidden=int(get("hidden_size")), intermediate=int(get("intermediate_size")),
                      layers=layers, heads=heads, kv_heads=int(get("num_key_value_heads") or heads),
                      vocab=int(get("vocab_size")), tied_embeddings=bool(get("tie_word_embeddings", False)),
                      head_dim=int(get("head_dim") or 0), qk_norm=QK_NORM.get(get("model_type") or "", ""), **moe)


def resolve_model(spec: str) -> ModelShape:
    """A preset name (case-insensitive, e.g. `Llama-3-8B`) or a checkpoint folder / config.json."""
    key = spec.strip().lower().rsplit("/", 1)[-1].removeprefix("meta-")
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    path = Path(spec)
    config_file = path / "config.json" if path.is_dir() else path
    if path.exists() and config_file.name.endswith(".json") and config_file.is_file():
        try:
            data = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_file}: not valid JSON ({err})") from err
        return shape_from_config(data, name=path.name or str(path))
    raise ValueError(f"--model {spec!r} is neither a preset ({', '.join(p.name for p in PRESETS.values())}) "
                     "nor a checkpoint folder with a config.json")
