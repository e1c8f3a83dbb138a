"""The dimensions of a Llama-architecture model that memory depends on: from a checkpoint's
config.json, or a preset of the published configurations."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-architecture model that memory depends on."""

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

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """`(out, in)` of each linear of one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.hd, self.kv_heads * self.hd
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def params(self) -> int:
        per_layer = sum(o * i for o, i in self.linear_shapes().values()) + 2 * self.hidden
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.layers * per_layer + self.vocab * self.hidden + head + self.hidden


# Published configurations (the models' own config.json files on the Hugging Face Hub).
PRESETS = {
    "llama-2-7b": ModelShape("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000, False),
    "llama-2-13b": ModelShape("Llama-2-13B", 5120, 13824, 40, 40, 40, 32000, False),
    "llama-2-70b": ModelShape("Llama-2-70B", 8192, 28672, 80, 64, 8, 32000, False),
    "llama-65b": ModelShape("LLaMA-65B", 8192, 22016, 80, 64, 64, 32000, False),
    "llama-3-8b": ModelShape("Llama-3-8B", 4096, 14336, 32, 32, 8, 128256, False),
    "llama-3-70b": ModelShape("Llama-3-70B", 8192, 28672, 80, 64, 8, 128256, False),
    "smollm2-135m": ModelShape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, True),
}


def shape_from_config(config, name: str = "model") -> ModelShape:
    """A `ModelShape` from a transformers config object or a config.json dict."""
    get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else \
        (lambda k, d=None: getattr(config, k, d))
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if get(k) is None]
    if missing:
        raise ValueError(f"{name}: config lacks {', '.join(missing)}; a Llama-architecture config is expected")
    heads = int(get("num_attention_heads"))
    return ModelShape(name=name, hidden=int(get("hidden_size")), intermediate=int(get("intermediate_size")),
                      layers=int(get("num_hidden_layers")), heads=heads,
                      kv_heads=int(get("num_key_value_heads") or heads), vocab=int(get("vocab_size")),
                      tied_embeddings=bool(get("tie_word_embeddings", False)),
                      head_dim=int(get("head_dim") or 0))


def resolve_model(spec: str) -> ModelShape:
    """A preset name (case-insensitive, e.g. `Llama-3-8B`) or a checkpoint folder / config.json."""
    key = spec.strip().lower().rsplit("/", 1)[-1].removeprefix("meta-")
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
