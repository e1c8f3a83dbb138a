"""Merged model as one GGUF file (llama.cpp's format), written with the `gguf` package's GGUFWriter.

Llama family only (transformers `model_type` "llama": Llama 2/3, SmolLM2): the hyperparameters,
tokenizer (byte-level BPE: `tokenizer.ggml.model` "gpt2", as llama.cpp's converter writes Llama 3
and SmolLM2) and chat template go into the metadata; tensors are named by the gguf package's own
tensor-name map (the one transformers' GGUF loader inverts). The q and k projections are permuted
as llama.cpp's `convert_hf_to_gguf.py` does (rotary halves interleaved per head; transformers'
loader undoes it). Quantization is the gguf package's Python quantizer: `f32`, `f16`, `bf16`,
`q8_0`, `q5_1`, `q5_0`, `q4_1`, `q4_0` (it has no Python quantizer for the k-quants such as
q4_k_m). As llama.cpp's tools do: 1-D tensors stay F32, a matrix whose rows are not whole
quantization blocks is stored F16, and with a 4- or 5-bit type the output head (the embedding when
tied) is Q8_0 (llama.cpp would use Q6_K, which Python cannot write).

Tensors are merged, converted and written one at a time: the tensor table is written first
(shapes and types are known before any value), then each tensor's data. The file is built in a
temporary folder renamed into place when complete.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from qdora.core.safetensors_io import atomic_dir, check_finite, output_folder
from qdora.export.merge import merged_tensors

QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
"""GGUF types the gguf package can write from Python."""

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_package():
    """The `gguf` package, or ImportError saying how to install it."""
    try:
        import gguf  # optional (the `dev` extra): only GGUF export and GGUF loading need it
    except ImportError as err:
        raise ImportError("--format gguf needs the `gguf` package: pip install gguf") from err
    return gguf


def _qtype(quant: str):
    gguf = gguf_package()
    if quant not in QUANTS:
        raise ValueError(f"GGUF type {quant!r} is unknown; choose one of {', '.join(QUANTS)} (the types the gguf "
                         "package can write from Python; k-quants such as q4_k_m need llama.cpp's llama-quantize)")
    t = gguf.GGMLQuantizationType
    f = gguf.LlamaFileType
    return {"f32": (t.F32, f.ALL_F32), "f16": (t.F16, f.MOSTLY_F16), "bf16": (t.BF16, f.MOSTLY_BF16),
            "q8_0": (t.Q8_0, f.MOSTLY_Q8_0), "q5_1": (t.Q5_1, f.MOSTLY_Q5_1), "q5_0": (t.Q5_0, f.MOSTLY_Q5_0),
            "q4_1": (t.Q4_1, f.MOSTLY_Q4_1), "q4_0": (t.Q4_0, f.MOSTLY_Q4_0)}[quant]


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("the model config has no rope_theta; it cannot be written to GGUF")
    return float(theta)


def check_config(config) -> None:
    """Raise `ValueError` unless `config` (a transformers config) is a Llama model this exporter writes."""
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise ValueError(f"--format gguf supports the Llama family (model_type 'llama': Llama 2/3, SmolLM2); "
                         f"this model is {model_type!r}. Use --format safetensors or nf4, or llama.cpp's "
                         "convert_hf_to_gguf.py on the merged checkpoint")
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    scaling = getattr(config, "rope_scaling", None)
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        raise ValueError(f"rope scaling {rope_type!r} (e.g. Llama 3.1's) is not written to GGUF by qdora; use "
                         "--format safetensors and llama.cpp's convert_hf_to_gguf.py")


def tokenizer_kind(tokenizer_json: dict) -> tuple[str, str]:
    """`(tokenizer.ggml.model, tokenizer.ggml.pre)` for a `tokenizer.json`, or `ValueError`."""
    model = tokenizer_json.get("model") or {}
    decoder = tokenizer_json.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise ValueError(f"the tokenizer ({model.get('type')} model, {decoder.get('type')} decoder) is not a "
                         "byte-level BPE one (Llama 3, SmolLM2): qdora writes only those to GGUF; use --format "
                         "safetensors and llama.cpp's convert_hf_to_gguf.py for others (e.g. Llama 2's sentencepiece)")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2", "gpt-2"  # llama.cpp's name for the GPT-2 pre-tokenizer
    if (kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT
            and not parts[1].get("use_regex", True)):
        return "gpt2", "llama-bpe"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "gpt2", "smollm"
    raise ValueError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) is not one qdora can name for "
                     "llama.cpp (GPT-2, Llama 3 or SmolLM byte-level); use --format safetensors and llama.cpp's "
                     "convert_hf_to_gguf.py")


def check_export(checkpoint: str | os.PathLike, quant: str) -> None:
    """Every check that needs no model: the GGUF type, the gguf package, the architecture and the
    tokenizer of the base checkpoint folder. Raises `ValueError` (or `ImportError`) with the way out."""
    from transformers import AutoConfig  # heavy, used here only
    _qtype(quant)
    checkpoint = Path(checkpoint)
    check_config(AutoConfig.from_pretrained(checkpoint))
    path = checkpoint / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"--format gguf needs the tokenizer in the file (GGUF carries it); {path} is missing")
    tokenizer_kind(json.loads(path.read_text(encoding="utf-8")))


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's permutation of a q or k projection (`convert_hf_to_gguf.py` LlamaModel.permute):
    per head, the two rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permuted(produce, n_head: int) -> torch.Tensor:
    return permute_qk(produce(), n_head)


def _vocab(tokenizer, n_vocab: int):
    """Tokens, their GGUF types, as llama.cpp's converter lists them (`get_vocab_base`): padded
    with `[PAD<i>]` up to the embedding's rows."""
    gguf = gguf_package()
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(by_id) > n_vocab:
        raise ValueError(f"the tokenizer has {len(by_id)} tokens, more than the model's {n_vocab} embeddings")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _metadata(writer, config, tokenizer, ftype, name: str) -> None:
    gguf = gguf_package()
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        model, pre = tokenizer_kind(json.loads((Path(d) / "tokenizer.json").read_text(encoding="utf-8")))
        special = gguf.SpecialVocab(Path(d), load_merges=True, n_vocab=config.vocab_size)
    tokens, types = _vocab(tokenizer, config.vocab_size)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def _plan(model: nn.Module, quant: str, original_checkpoint, adapted: bool):
    """[(gguf name, numpy shape, GGML type, producer of the fp32 tensor in GGUF layout)]."""
    gguf = gguf_package()
    config = model.config
    check_config(config)
    qtype, _ = _qtype(quant)
    t = gguf.GGMLQuantizationType
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head_key = "model.embed_tokens.weight" if tied else "lm_head.weight"
    out = []
    for spec, fn in merged_tensors(model, torch.float32, original_checkpoint, adapted):
        if tied and spec.name == "lm_head.weight":
            continue
        stem, _, suffix = spec.name.rpartition(".")
        name = names.get_name(stem)
        if name is None:
            raise ValueError(f"tensor {spec.name!r} has no GGUF name in the gguf package's Llama map")
        if stem.endswith("self_attn.q_proj") or stem.endswith("self_attn.k_proj"):
            n = heads if stem.endswith("q_proj") else kv
            fn = functools.partial(_permuted, fn, n)
        kind = qtype
        if len(spec.shape) == 1:
            kind = t.F32
        else:
            if qtype in (t.Q4_0, t.Q4_1, t.Q5_0, t.Q5_1) and spec.name == head_key:
                kind = t.Q8_0
            block, _ = gguf.GGML_QUANT_SIZES[kind]
            if spec.shape[-1] % block:
                kind = t.F16
        out.append((f"{name}.{suffix}", tuple(spec.shape), kind, fn))
    return out


def _convert(t: torch.Tensor, kind) -> np.ndarray:
    gguf = gguf_package()
    data = t.detach().to(torch.float32).contiguous().numpy()
    if kind == gguf.GGMLQuantizationType.F32:
        return data
    return gguf.quants.quantize(data, kind)


def save_gguf(model: nn.Module, out_dir: str | os.PathLike, tokenizer, quant: str = "q8_0",
              original_checkpoint: str | os.PathLike | None = None, overwrite: bool = False,
              adapted: bool = True, file_name: str | None = None) -> Path:
    """Write `model` with its adapters merged as one GGUF file of type `quant` in folder `out_dir`
    (`<model name>-<quant>.gguf` unless `file_name`). Returns the file's path. `original_checkpoint`,
    `adapted`: as `qdora.export.merge.merge_and_save`."""
    gguf = gguf_package()
    out_dir = output_folder(out_dir, overwrite, original_checkpoint)
    if tokenizer is None:
        raise ValueError("a GGUF file carries its tokenizer; none was found next to the base model")
    _, ftype = _qtype(quant)
    plan = _plan(model, quant, original_checkpoint, adapted)
    name = Path(str(getattr(model.config, "_name_or_path", "") or "model")).name or "model"
    file_name = file_name or f"model-{quant}.gguf"

    with atomic_dir(out_dir) as tmp:
        writer = gguf.GGUFWriter(tmp / file_name, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        try:
            _write(writer, plan, model, tokenizer, ftype, name, quant)
        except OSError as err:
            # numpy's tofile reports a short write without an errno ("N requested and M written")
            if err.errno is None and shutil.disk_usage(tmp).free < _nbytes(plan):
                raise OSError(errno.ENOSPC, f"No space left on device: {out_dir / file_name} not written ({err}); "
                                            "free some space or choose another --out") from None
            raise
        finally:
            writer.close()
    return out_dir / file_name


def _nbytes(plan) -> int:
    gguf = gguf_package()
    return sum(int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, kind))) for _, shape, kind, _ in plan)


def _write(writer, plan, model, tokenizer, ftype, name: str, quant: str) -> None:
    """Metadata, tensor table, then each tensor: merged, converted, written and freed in turn."""
    gguf = gguf_package()
    _metadata(writer, model.config, tokenizer, ftype, name)
    for key, shape, kind, _ in plan:
        nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, kind)))
        writer.add_tensor_info(key, shape, np.dtype(np.float32), nbytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for key, shape, kind, fn in tqdm(plan, desc=f"merging to GGUF {quant}", unit="tensor", disable=None):
        t = fn()
        check_finite(key, t)
        data = _convert(t, kind)
        del t
        writer.write_tensor_data(data)
    for f in writer.fout or []:
        f.flush()
        os.fsync(f.fileno())
