"""The dimensions of a Llama-architecture model that memory depends on: from a checkpoint's
config.json, or a preset of the published configurations. A mixture-of-experts model (Qwen2/3-MoE,
OLMoE, Mixtral, GLM-4-MoE: transformers' fused `experts.gate_up_proj (E, 2I, H)` and `experts.down_proj
(E, H, I)` with a router `mlp.gate (E, H)`) has `num_experts` > 0; its MoE layers may carry a shared MLP
beside the experts (Qwen2-MoE's `shared_expert` with its `shared_expert_gate`, DeepSeek-V3's and
GLM-4-MoE's `shared_experts`), and some of its layers may be dense (`dense_layers`)."""

from __future__ import annotations

import json
import math
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
    `mlp_only_layers`, `decoder_sparse_step`; DeepSeek-V3's and GLM-4-MoE's first
    `first_k_dense_replace`); the others are MoE layers."""
    shared_experts: int = 0
    """Shared (always-on) experts per MoE layer: one MLP of `shared_intermediate` beside the routed ones."""
    shared_intermediate: int = 0
    """The MoE layers' shared MLP's intermediate size (0: none): Qwen2-MoE's
    `shared_expert_intermediate_size`, DeepSeek-V3's and GLM-4-MoE's `n_shared_experts × moe_intermediate_size`."""
    shared_gate: bool = False
    """Qwen2-MoE's layout: the shared MLP is `mlp.shared_expert`, scaled by `sigmoid(shared_expert_gate(x))`
    (a linear `(1, H)`); otherwise `mlp.shared_experts`, added as it is (DeepSeek-V3, GLM-4-MoE)."""
    norm_topk: bool = True
    """The top-k routing weights are renormalised to sum to 1 (`norm_topk_prob`; Mixtral always)."""
    router_groups: tuple[int, ...] = ()
    """`(n_group, topk_group)` of DeepSeek-V3's and GLM-4-MoE's router (sigmoid scores, a score-correction
    bias buffer `(E,)`, the top k among the best groups); empty: a softmax router (Qwen, OLMoE, Mixtral)."""
    attention_bias: tuple[str, ...] = ()
    """The attention linears with a bias (Qwen2-MoE's and GLM-4-MoE's q, k, v)."""
    rotary_dim: int = 0
    """Rotated dimensions of each head (0: all, `head_dim`; GLM-4-MoE's `partial_rotary_factor` 0.5: half)."""
    norms: int = 2
    """RMSNorms per decoder layer: 2 (before attention and before the MLP), 4 in Gemma 2 and 3 (before and after
    each)."""
    sliding_window: int = 0
    """Tokens of the sliding window of the windowed layers (0: every layer attends to all tokens before it).
    Training runs them in blocks with one shared mask of `window × (2·window − 1)` (`qdora.packed_sdpa`)."""
    softcap_logits: bool = False
    """The logits are soft-capped (Gemma 2's `final_logit_softcapping`): the chunked loss's backward holds one more
    chunk (`tanh`)."""
    softcap_attention: bool = False
    """The attention soft-caps its scores (Gemma 2's `attn_logit_softcapping`): training runs it in tiles of queries
    (`qdora.packed_sdpa`: "qdora_softcap"), holding one tile's scores at a time (`softcap_tile_rows`)."""
    attention: str = "gqa"
    """"gqa": q/k/v/o_proj; "mla": DeepSeek-V2/V3's multi-head latent attention (`kv_lora_rank`), whose
    parameters and activations are not modeled (`attention_params` says so)."""

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

    @property
    def rd(self) -> int:
        """Rotated dimensions of each head."""
        return self.rotary_dim or self.hd

    @property
    def shared_prefix(self) -> str:
        """The shared MLP's module name inside an MoE layer's `mlp` ("": none)."""
        return "" if not self.shared_intermediate else "shared_expert" if self.shared_gate else "shared_experts"

    def attention_shapes(self) -> dict[str, tuple[int, int]]:
        """`(out, in)` of each attention linear of one decoder layer."""
        if self.attention != "gqa":
            raise ValueError(f"{self.name}: multi-head latent attention (DeepSeek-V2/V3: q_a_proj, q_b_proj, "
                             "kv_a_proj_with_mqa, kv_b_proj of q_lora_rank, kv_lora_rank, qk_rope_head_dim) is not "
                             "planned; the planner models q/k/v/o_proj attention (its MoE layers are modeled)")
        h, q, kv = self.hidden, self.heads * self.hd, self.kv_heads * self.hd
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}

    def mlp_shapes(self, moe_layer: bool) -> dict[str, tuple[int, int]]:
        """`(out, in)` of the linears of one layer's MLP, by the name a target matches with its dotted
        suffix (as `add_adapters`): a dense layer's `gate_proj`, `up_proj`, `down_proj`; an MoE layer's
        shared MLP (`shared_expert.gate_proj`, ... or `shared_experts....`) and `shared_expert_gate`."""
        h, i, p = self.hidden, self.shared_intermediate if moe_layer else self.intermediate, self.shared_prefix
        if moe_layer and not p:
            return {}
        pre = f"{p}." if moe_layer else ""
        out = {f"{pre}gate_proj": (i, h), f"{pre}up_proj": (i, h), f"{pre}down_proj": (h, i)}
        return {**out, "shared_expert_gate": (1, h)} if moe_layer and self.shared_gate else out

    def linear_shapes(self, moe_layer: bool | None = None) -> dict[str, tuple[int, int]]:
        """`(out, in)` of each linear of one decoder layer: the attention's and the MLP's (`mlp_shapes`),
        of an MoE's MoE layer (`moe_layer` None: of an MoE, its MoE layers)."""
        moe_layer = self.moe if moe_layer is None else moe_layer
        return {**self.attention_shapes(), **self.mlp_shapes(moe_layer)}

    def linear_names(self) -> set[str]:
        """The names of every linear of every decoder layer (dense and MoE layers)."""
        kinds = ([True] if self.moe_layers else []) + ([False] if self.layers > self.moe_layers else [])
        return {name for kind in kinds for name in self.linear_shapes(kind)}

    def expert_shapes(self) -> dict[str, tuple[int, int]]:
        """`(out, in)` of one expert's projections (`qdora.core.experts.QDoRAExperts`), by target name."""
        h, i = self.hidden, self.moe_intermediate
        return {"experts.gate_up_proj": (2 * i, h), "experts.down_proj": (h, i)} if self.moe else {}

    def qk_norm_params(self) -> int:
        q, kv = self.heads * self.hd, self.kv_heads * self.hd
        return {"": 0, "head": 2 * self.hd, "full": q + kv}[self.qk_norm]

    def attention_params(self) -> int:
        """One layer's attention: its linears, their biases, the q/k norms."""
        shapes = self.attention_shapes()
        return (sum(o * i for o, i in shapes.values()) + sum(shapes[n][0] for n in self.attention_bias)
                + self.qk_norm_params())

    def params(self, attention: bool = True) -> int:
        """Parameters, as transformers' model on the meta device counts them (buffers left out); without
        the attention's with `attention=False` (DeepSeek-V3's latent attention is not modeled)."""
        h = self.hidden
        dense = sum(o * i for o, i in self.mlp_shapes(False).values())
        routed = (self.num_experts * (sum(o * n for o, n in self.expert_shapes().values()) + h)  # + router
                  + sum(o * i for o, i in self.mlp_shapes(True).values()))                       # + shared MLP
        head = 0 if self.tied_embeddings else self.vocab * h
        return (self.layers * ((self.attention_params() if attention else 0) + self.norms * h)
                + (self.layers - self.moe_layers) * dense
                + self.moe_layers * routed + self.vocab * h + head + h)


# Published configurations (the models' own config.json files on the Hugging Face Hub).
PRESETS = {
    "llama-2-7b": ModelShape("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000, False),
    "llama-2-13b": ModelShape("Llama-2-13B", 5120, 13824, 40, 40, 40, 32000, False),
    "llama-2-70b": ModelShape("Llama-2-70B", 8192, 28672, 80, 64, 8, 32000, False),
    "llama-65b": ModelShape("LLaMA-65B", 8192, 22016, 80, 64, 64, 32000, False),
    "llama-3-8b": ModelShape("Llama-3-8B", 4096, 14336, 32, 32, 8, 128256, False),
    "llama-3-70b": ModelShape("Llama-3-70B", 8192, 28672, 80, 64, 8, 128256, False),
    "smollm2-135m": ModelShape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, True),
    "mistral-7b-v0.3": ModelShape("Mistral-7B-v0.3", 4096, 14336, 32, 32, 8, 32768, False, head_dim=128),
    "qwen2.5-7b": ModelShape("Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, False,
                             attention_bias=("q_proj", "k_proj", "v_proj")),
    "qwen3-8b": ModelShape("Qwen3-8B", 4096, 12288, 36, 32, 8, 151936, False, head_dim=128, qk_norm="head"),
    # Gemma 2: four norms a layer, a 4,096-token window on every other layer, soft-capped scores and logits
    "gemma-2-2b": ModelShape("Gemma-2-2B", 2304, 9216, 26, 8, 4, 256000, True, head_dim=256, norms=4,
                             sliding_window=4096, softcap_logits=True, softcap_attention=True),
    "gemma-2-9b": ModelShape("Gemma-2-9B", 3584, 14336, 42, 16, 8, 256000, True, head_dim=256, norms=4,
                             sliding_window=4096, softcap_logits=True, softcap_attention=True),
    "gemma-2-27b": ModelShape("Gemma-2-27B", 4608, 36864, 46, 32, 16, 256000, True, head_dim=128, norms=4,
                              sliding_window=4096, softcap_logits=True, softcap_attention=True),
    # Mixtures of experts, every layer routed: Qwen/Qwen3-30B-A3B, allenai/OLMoE-1B-7B-0924,
    # mistralai/Mixtral-8x7B-v0.1 (`intermediate` is the config's dense size, unused without dense layers).
    "qwen3-30b-a3b": ModelShape("Qwen3-30B-A3B", 2048, 6144, 48, 32, 4, 151936, False, head_dim=128,
                                qk_norm="head", num_experts=128, experts_per_token=8, moe_intermediate=768),
    "olmoe-1b-7b": ModelShape("OLMoE-1B-7B", 2048, 1024, 16, 16, 16, 50304, False, qk_norm="full",
                              num_experts=64, experts_per_token=8, moe_intermediate=1024, norm_topk=False),
    "mixtral-8x7b": ModelShape("Mixtral-8x7B", 4096, 14336, 32, 32, 8, 32000, False, num_experts=8,
                               experts_per_token=2, moe_intermediate=14336),
    # With shared experts: Qwen/Qwen1.5-MoE-A2.7B (a gated shared expert, q/k/v biases, top-k weights as
    # routed) and zai-org/GLM-4.5-Air (a dense first layer, a shared expert, sigmoid routing, q/k/v biases,
    # half of each head rotated; its multi-token-prediction layer, which transformers does not load, left out).
    "qwen1.5-moe-a2.7b": ModelShape("Qwen1.5-MoE-A2.7B", 2048, 5632, 24, 16, 16, 151936, False, num_experts=60,
                                    experts_per_token=4, moe_intermediate=1408, shared_experts=1,
                                    shared_intermediate=5632, shared_gate=True, norm_topk=False,
                                    attention_bias=("q_proj", "k_proj", "v_proj")),
    "glm-4.5-air": ModelShape("GLM-4.5-Air", 4096, 10944, 46, 96, 8, 151552, False, head_dim=128, num_experts=128,
                              experts_per_token=8, moe_intermediate=1408, dense_layers=(0,), shared_experts=1,
                              shared_intermediate=1408, router_groups=(1, 1),
                              attention_bias=("q_proj", "k_proj", "v_proj"), rotary_dim=64),
}
ALIASES = {"olmoe-1b-7b-0924": "olmoe-1b-7b", "mixtral-8x7b-v0.1": "mixtral-8x7b",
           "mistral-7b-instruct-v0.3": "mistral-7b-v0.3", "qwen2.5-7b-instruct": "qwen2.5-7b",
           **{f"gemma-2-{n}-it": f"gemma-2-{n}" for n in ("2b", "9b", "27b")}}
"""Hub names of the presets, beside their short names."""


QK_NORM = {"qwen3": "head", "qwen3_moe": "head", "olmoe": "full", "olmo2": "full", "gemma3_text": "head"}
"""Architectures (`model_type`) that normalize queries and keys, and how (GLM-4-MoE: per head with `use_qk_norm`)."""
QKV_BIAS = {"qwen2": ("", True), "qwen2_moe": ("qkv_bias", True), "glm4_moe": ("attention_bias", False)}
"""Architectures whose q, k, v (not o) may carry a bias: the config field that says so ("": always) and its
default; elsewhere `attention_bias` puts one on all four."""
LAYER_NORMS = {"gemma2": 4, "gemma3_text": 4}
"""Architectures with other than 2 RMSNorms per decoder layer (`ModelShape.norms`)."""
SIGMOID_ROUTERS = ("deepseek_v3", "glm4_moe")
"""Architectures whose router scores with a sigmoid and picks among groups (`ModelShape.router_groups`)."""


SOFTCAP_TILE_BYTES = {"cpu": 4 * 2**20, "cuda": 128 * 2**20}
"""The fp32 scores of one tile of queries of the soft-capped attention (`qdora.packed_sdpa`'s "qdora_softcap"), at
most, by device type. On CPU, tiles within the caches run fastest: a 4-layer Gemma 2 (hidden 256, 8 heads of 32)
trained a 2,048-token step in 0.92 s with 1 MiB tiles, 0.99 with 4, 1.20 with 16, 1.42 with 32, and 2.94 on
transformers' eager attention (`python -m qdora.eval.bench.packed_attention --softcap`). On CUDA larger tiles launch
fewer kernels (not measured yet: docs/gpu.md gives the command)."""


def softcap_tile_rows(heads: int, keys: int, device_type: str = "cpu", window: int | None = None) -> int:
    """Queries per tile of the soft-capped attention over a sequence of `keys` tokens with `heads` heads (times the
    batch where a tile spans it): as many as keep the tile's fp32 scores within `SOFTCAP_TILE_BYTES`, at least one.
    Under a sliding window a tile of r queries sees `min(keys, r + window − 1)` keys."""
    budget = SOFTCAP_TILE_BYTES["cpu" if device_type == "cpu" else "cuda"] // (4 * heads)  # scores a tile
    keys = max(keys, 1)
    if window is not None and window < keys:  # the largest r with r·(r + window − 1) within the budget
        rows = (math.isqrt((window - 1) ** 2 + 4 * budget) - (window - 1)) // 2
        if rows + window - 1 < keys:
            return max(1, rows)
    return max(1, budget // keys)


def used_sliding_window(config) -> int:
    """The sliding window (tokens) of the windowed layers of a transformers config object or config.json dict, or 0
    where no layer uses one: a config may carry a `sliding_window` that none of its `layer_types` is windowed for,
    or (Qwen2) that only `use_sliding_window` turns on."""
    get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else \
        (lambda k, d=None: getattr(config, k, d))
    window, layer_types = int(get("sliding_window") or 0), get("layer_types")
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else 0
    return window if get("use_sliding_window", True) else 0


def shape_from_config(config, name: str = "model") -> ModelShape:
    """A `ModelShape` from a transformers config object or a config.json dict (an MoE's experts from
    `num_experts`, `num_local_experts` or `n_routed_experts`, `num_experts_per_tok`, `moe_intermediate_size`;
    its shared MLP from `shared_expert_intermediate_size` or `n_shared_experts`; its dense layers from
    `mlp_only_layers`, `decoder_sparse_step` or `first_k_dense_replace`)."""
    get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else \
        (lambda k, d=None: getattr(config, k, d))
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if get(k) is None]
    if missing:
        raise ValueError(f"{name}: config lacks {', '.join(missing)}; a Llama-architecture config is expected")
    heads, layers, kind = int(get("num_attention_heads")), int(get("num_hidden_layers")), get("model_type") or ""
    experts = int(get("num_experts") or get("num_local_experts") or get("n_routed_experts") or 0)
    moe = {}
    if experts:
        step = int(get("decoder_sparse_step") or 1)
        only = set(get("mlp_only_layers") or ()) | set(range(int(get("first_k_dense_replace") or 0)))
        inter = int(get("moe_intermediate_size") or get("intermediate_size"))
        shared = int(get("n_shared_experts") or (1 if get("shared_expert_intermediate_size") else 0))
        moe = dict(num_experts=experts, experts_per_token=int(get("num_experts_per_tok") or 0), moe_intermediate=inter,
                   dense_layers=tuple(i for i in range(layers) if i in only or (i + 1) % step), shared_experts=shared,
                   shared_intermediate=int(get("shared_expert_intermediate_size") or shared * inter),
                   shared_gate=bool(get("shared_expert_intermediate_size")),
                   norm_topk=bool(get("norm_topk_prob", True)),
                   router_groups=(int(get("n_group") or 1), int(get("topk_group") or 1)) if kind in SIGMOID_ROUTERS
                   else ())
    head_dim = int(get("head_dim") or 0) or int(get("hidden_size")) // heads
    rope = get("rope_parameters") if isinstance(get("rope_parameters"), dict) else {}
    partial = float(get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0)
    field, default = QKV_BIAS.get(kind, ("attention_bias", False))
    biased = ("q_proj", "k_proj", "v_proj") + (() if kind in QKV_BIAS else ("o_proj",))
    bias = biased if not field or get(field, default) else ()
    qk_norm = ("head" if get("use_qk_norm") else "") if kind == "glm4_moe" else QK_NORM.get(kind, "")
    return ModelShape(name=name, hidden=int(get("hidden_size")), intermediate=int(get("intermediate_size")),
                      layers=layers, heads=heads, kv_heads=int(get("num_key_value_heads") or heads),
                      vocab=int(get("vocab_size")), tied_embeddings=bool(get("tie_word_embeddings", False)),
                      head_dim=int(get("head_dim") or 0), qk_norm=qk_norm, attention_bias=bias,
                      rotary_dim=int(head_dim * partial) if partial != 1.0 else 0, norms=LAYER_NORMS.get(kind, 2),
                      sliding_window=used_sliding_window(config),
                      softcap_logits=bool(get("final_logit_softcapping")),
                      softcap_attention=bool(get("attn_logit_softcapping")),
                      attention="mla" if get("kv_lora_rank") else "gqa", **moe)


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
