"""A tiny chat model on disk with adapters of several kinds, and the in-process answers they must give:
the oracle of the serving tests is `model.generate` on a model loaded with `qdora.load_adapter`."""

import json
from pathlib import Path

import torch
from models import build, chatml_tokenizer, llama3_config, perturb

from qdora import AdapterConfig, load_adapter, load_model, save_adapter

CORPUS = ["What is the capital of France? Paris is the capital.", "Name a fruit: apple, pear, plum.",
          "The sky is blue and the grass is green.", "Count: one two three four five six seven eight nine ten."]
PROMPTS = ["What is the capital of France?", "Name a fruit", "Count: one two", "The sky is"]
ADAPTERS = {
    # name: (config, format written)
    "qd": (AdapterConfig(method="qdora", r=4, alpha=8, dropout=0.0, adapter_dtype="float32"), "qdora"),
    "ql": (AdapterConfig(method="qlora", r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"),
                         adapter_dtype="float32"), "qdora"),
    "pd": (AdapterConfig(method="qdora", r=2, alpha=4, dropout=0.0, target_modules=("q_proj", "o_proj", "up_proj"),
                         adapter_dtype="float32"), "peft"),
}


def make_model_dir(root: Path) -> Path:
    """A tiny Llama-3-shaped chat model (ChatML, byte-level BPE) whose logits are far apart (the LM head
    scaled up), so that greedy answers do not hang on the rounding of a batched matmul."""
    path = root / "m"
    model = build(llama3_config(vocab_size=512, intermediate_size=256, max_position_embeddings=256))
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    model.save_pretrained(path)
    chatml_tokenizer(CORPUS).save_pretrained(path)
    return path


def make_adapters(model_dir: Path, root: Path) -> dict[str, Path]:
    out = {}
    for seed, (name, (cfg, fmt)) in enumerate(ADAPTERS.items()):
        model, _ = load_model(model_dir, method=cfg.method, cfg=cfg, progress=False)
        perturb(model, seed=seed + 11)
        save_adapter(model, root / name, format=fmt)
        out[name] = root / name
    return out


def model_and_adapters(root: Path) -> tuple[Path, dict[str, Path]]:
    """The tiny chat model under `root` and its adapters (`ADAPTERS`) beside it."""
    model_dir = make_model_dir(root)
    return model_dir, make_adapters(model_dir, root)


def in_process(model_dir: Path, adapter: Path | None):
    """The model as a user loads it in Python: the NF4 base, the adapter added by `load_adapter`."""
    model, tok = load_model(model_dir, method="qdora", add=False, progress=False)
    if adapter is not None:
        load_adapter(model, adapter, verbose=False)
    return model.eval(), tok


def chat_ids(tok, prompt: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids


def greedy(model, tok, ids: list[int], max_new_tokens: int) -> list[int]:
    """`model.generate` greedy: the answer's token ids, without the end-of-sequence token."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    return [t for t in out if t != tok.eos_token_id]


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path
