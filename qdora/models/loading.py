"""Loading models: a transformers checkpoint folder shard by shard straight to NF4, or a GGUF file.

`load_model` builds the model on the meta device (no memory), then reads the safetensors shards one
at a time and tensor by tensor: a linear weight that will be NF4 is quantized as it arrives and only
its packed form is kept; every other tensor is materialized in the storage dtype. Peak memory is
the NF4 model plus the tensor being converted (shards are memory-mapped, not read whole).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from qdora.core.config import AdapterConfig
from qdora.core.nf4 import linear4bit_from_weight
from qdora.models.adapter_save import route_save_pretrained
from qdora.models.gguf import CACHE_VERSION, SMOLLM2_FILE, convert_gguf, gguf_cache_dir, smollm2_gguf_path  # noqa: F401
from qdora.models.hf_config import plain_config, set_config_dtype  # noqa: F401  (plain_config: also from here)
from qdora.models.moe import expert_source, fuse_expert, missing_experts, split_experts
from qdora.models.reader import INDEX, SINGLE, CheckpointReader  # noqa: F401  (also from here)
from qdora.models.surgery import (
    add_adapters,
    apply_adapters,
    experts_needed,
    linear_module_names,
    param_report,
    plan_adapters,
    targets,
)


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim). Quantizing makes large short-lived
    temporaries; without this, glibc keeps their pages and the process's RSS ratchets up."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes  # optional: glibc only
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None
TRIM_EVERY = 1 << 21
"""Elements quantized between two returns of freed memory to the OS (≈ 29 MB of temporaries)."""


def _storage_dtype(dtype, config, device: torch.device) -> torch.dtype:
    if dtype not in (None, "auto"):
        return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))
    if device.type == "cpu":
        return torch.float32  # bf16 matmuls are hundreds of times slower than fp32 on most CPUs
    saved = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) else torch.bfloat16


def attention_implementation(model_class, device: torch.device, dtype: torch.dtype) -> str:
    """The attention `qdora` builds a model with: on CUDA "flash_attention_2" when the `flash_attn`
    package imports, `dtype` is bf16 or fp16 and the model supports it (packed rows then need no
    `tokens x tokens` mask: its variable-length path); else "sdpa", transformers' own default (it
    never picks flash attention), or "eager" for a model without sdpa, as transformers falls back."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) \
            and getattr(model_class, "_supports_flash_attn", False):
        try:
            import flash_attn  # noqa: F401  (optional: only whether it imports matters)
            return "flash_attention_2"
        except Exception:  # not installed, or built for another torch or CUDA
            pass
    return "sdpa" if getattr(model_class, "_supports_sdpa", True) else "eager"


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(key)


def model_keys(model: nn.Module, keys: list[str], expected: set[str], path: Path) -> dict[str, str]:
    """Each checkpoint tensor name -> the name `model` gives it, as transformers renames keys on
    load: its renamings for this architecture and the legacy spellings (e.g. `LayerNorm.gamma`), and
    the base-model prefix added or dropped (a `LlamaModel` checkpoint read into `LlamaForCausalLM`).
    An MoE's per-expert tensors keep their renamed names (`CheckpointModel.place_expert` puts them in
    place); any other key that transformers would merge with others (a `WeightConverter`) is refused
    by name: the streaming loader reads one tensor at a time."""
    if all(k in expected for k in keys):
        return {k: k for k in keys}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping  # heavy, used here only
        from transformers.core_model_loading import (  # heavy, used here only
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:  # transformers < 5: keys are read as they are
        return {k: k for k in keys}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = dict.fromkeys(expected, True)
    prefix = getattr(model, "base_model_prefix", None) or None
    names = {}
    for key in keys:
        name, converter = rename_source_key(key, renamings, converters, base_model_prefix=prefix, meta_state_dict=meta)
        if converter is not None:  # experts stored one tensor per expert: held apart or fused here, by the loader
            renamed, _ = rename_source_key(key, renamings, [], base_model_prefix=prefix, meta_state_dict=meta)
            if expert_source(renamed, model) is not None:
                names[key] = renamed
                continue
            raise ValueError(f"{path}: tensor {key!r} is one that transformers combines with others on load "
                             f"({converter!r}); the streaming loader reads one tensor at a time. Load the model with "
                             "transformers' from_pretrained and call qdora.add_adapters on it")
        names[key] = name
    return names


class CheckpointModel:
    """The model of checkpoint folder `path`, built on the meta device and filled tensor by tensor
    (`fill`): a linear weight that will be NF4 (`cfg.quantized`, not `keep_full_precision`) is
    quantized as it arrives and only its packed form is kept; every other tensor is materialized in
    the storage dtype `dtype` (`auto`: fp32 on CPU, the checkpoint's dtype on CUDA). The attention
    implementation is chosen for the device and that dtype (`attention_implementation`). Loaded
    parameters are frozen. `finish` ties the embeddings, checks that nothing is left on meta and
    returns `(model, tokenizer or None)`."""

    def __init__(self, path: str | os.PathLike, cfg: AdapterConfig, dtype=None,
                 device: str | torch.device = "cpu", progress: bool = True):
        from accelerate import init_empty_weights  # heavy: imports transformers' stack
        from transformers import AutoConfig, AutoModelForCausalLM  # heavy, used here only
        from transformers.models.auto.auto_factory import _get_model_class  # the class from_config builds

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path}: no config.json; expected a transformers checkpoint folder "
                                    "or a .gguf file")
        self.reader = CheckpointReader(self.path)
        self.config = AutoConfig.from_pretrained(self.path)
        self.device = torch.device(device)
        self.storage = _storage_dtype(dtype, self.config, self.device)
        try:
            model_class = _get_model_class(self.config, AutoModelForCausalLM._model_mapping)
        except KeyError:  # no such model: from_config says so below
            model_class = None
        attention = attention_implementation(model_class, self.device, self.storage)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(self.config, attn_implementation=attention)
        if cfg.method != "full":  # an MoE's experts held apart (qdora.models.moe), each quantized as it arrives
            split_experts(self.model, lambda name: experts_needed(name, cfg))
        self.to_nf4 = {n for n in linear_module_names(self.model)
                       if cfg.quantized and not any(targets(self.model, n, p) for p in cfg.keep_full_precision)}
        self.cfg = cfg
        self.expected = set(self.model.state_dict().keys())
        self.name_of = model_keys(self.model, self.reader.keys(), self.expected, self.path)
        """Checkpoint tensor name -> the model's name for it (transformers' renamings on load)."""
        self.unexpected: list[str] = []
        self.halves: dict[tuple[str, int], list] = {}
        """Per-expert checkpoints: an expert's gate rows waiting for its up rows (or the reverse)."""
        self.slices: dict[str, int] = {}
        """Per-expert tensors copied into a fused 3-D parameter, by parameter (checked by `finish`)."""
        self.bar = tqdm(total=len(self.reader.file_of), desc=f"loading {self.path.name}", unit="tensor",
                        disable=None if progress else True)
        self._since_trim = 0

    def place(self, key: str, tensor: torch.Tensor) -> None:
        """Put one checkpoint tensor into the meta model: NF4 for linear weights to quantize."""
        model, device, cfg = self.model, self.device, self.cfg
        module_name, _, attr = key.rpartition(".")
        if module_name not in self.to_nf4:
            # copy=True: a tensor read from a shard may share the shard's memory map; a kept view
            # would keep the whole mapped shard resident after we move on.
            dtype = self.storage if tensor.is_floating_point() else tensor.dtype
            _set_tensor(model, key, tensor.to(device=device, dtype=dtype, copy=True))
            return
        parent, _, child = module_name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        current = getattr(owner, child)
        if attr == "weight":
            layer = linear4bit_from_weight(tensor.to(device), None, cfg.nf4_blocksize, cfg.double_quant,
                                           cfg.quant_storage, has_bias=current.bias is not None)
            if current.bias is not None and current.bias.device.type != "meta":
                layer.bias = current.bias  # the bias arrived first
            setattr(owner, child, layer)
            # Quantizing leaves ~14 bytes per element of freed temporaries: hand them back every
            # TRIM_EVERY elements, not after every small tensor (trimming costs time).
            self._since_trim += tensor.numel()
            if self._since_trim >= TRIM_EVERY:
                self._since_trim = 0
                del tensor
                _release_freed_memory()
        else:  # the bias, onto whichever module (nn.Linear on meta, or Linear4bit) is there now
            current.bias = nn.Parameter(tensor.to(device=device, dtype=self.storage, copy=True), requires_grad=False)

    def fill(self, keys=None) -> None:
        """Read checkpoint tensors `keys` (default: all) into the model, one shard file mapped at a
        time, in the checkpoint's order within each file."""
        wanted = None if keys is None else set(keys)
        for file in self.reader.files:
            todo = [k for k in self.reader.keys_by_file[file] if wanted is None or k in wanted]
            if not todo:
                continue
            with self.reader.open(file) as shard:
                for key in todo:
                    self.bar.update(1)
                    name = self.name_of[key]
                    if name in self.expected:
                        self.place(name, shard.get(key))
                    elif (source := expert_source(name, self.model)) is not None:
                        self.place_expert(source, shard.get(key))
                    else:
                        self.unexpected.append(key)
            _release_freed_memory()

    def place_expert(self, source: tuple[str, str, int | None, int | None], tensor: torch.Tensor) -> None:
        """Put an MoE expert tensor in place (`qdora.models.moe.expert_source`): a fused 3-D tensor or
        one expert's gate, up or down weight, into held-apart experts (each expert's projection placed,
        so quantized, alone; gate and up rows joined first) or into a fused parameter (`method='full'`)."""
        owner_name, proj, expert, half = source
        owner = self.model.get_submodule(owner_name)
        if not hasattr(owner, "num_experts") or isinstance(getattr(owner, proj, None), nn.Parameter):
            fuse_expert(self.model, source, tensor.to(self.device, self.storage), self.slices)
            return
        if expert is None:
            if tensor.shape[0] != owner.num_experts:
                raise ValueError(f"{self.path}: {owner_name}.{proj} holds {tensor.shape[0]} experts, the model "
                                 f"{owner.num_experts}")
            for e in range(owner.num_experts):
                self.place(f"{owner_name}.{proj}.{e}.weight", tensor[e])
            return
        if half is None:
            self.place(f"{owner_name}.{proj}.{expert}.weight", tensor)
            return
        pair = self.halves.setdefault((owner_name, expert), [None, None])
        pair[half] = tensor.to(copy=True)
        if pair[0] is not None and pair[1] is not None:
            del self.halves[(owner_name, expert)]
            self.place(f"{owner_name}.{proj}.{expert}.weight", torch.cat(pair, 0))

    def check_experts(self) -> None:
        """Raise, naming them, if per-expert tensors are missing (see `qdora.models.moe.missing_experts`)."""
        problems = missing_experts(self.model, self.halves, self.slices)
        if problems:
            raise ValueError(f"{self.path}: incomplete experts: {'; '.join(problems[:5])}")

    def move_buffers(self, module: nn.Module) -> None:
        """Buffers the model built itself (e.g. rotary inv_freq) start on the CPU: move them to the device."""
        if self.device.type == "cpu":
            return
        for sub in module.modules():
            for name, buf in list(sub._buffers.items()):
                if buf is not None and buf.device != self.device:
                    sub._buffers[name] = buf.to(self.device)

    def check_filled(self, module: nn.Module, prefix: str = "") -> None:
        """Raise, naming them, if tensors of `module` were not in the checkpoint (still on meta)."""
        missing = sorted(prefix + n for n, t in list(module.named_parameters()) + list(module.named_buffers())
                         if t.device.type == "meta")
        if missing:
            raise ValueError(f"{self.path}: the checkpoint lacks {len(missing)} tensor(s) the model needs, "
                             f"e.g. {missing[:5]}")

    def finish(self):
        """Tie the embeddings, check the model is complete, and return `(model, tokenizer or None)`."""
        from transformers import GenerationConfig  # heavy, used here only

        model, path = self.model, self.path
        self.bar.close()
        if self.unexpected:
            warnings.warn(f"{path}: {len(self.unexpected)} checkpoint tensor(s) are not used by "
                          f"{type(model).__name__}, e.g. {self.unexpected[:3]}")
        self.move_buffers(model)
        if getattr(self.config, "tie_word_embeddings", False):
            model.tie_weights()
        set_config_dtype(model.config, self.storage)  # the dtype the unquantized tensors now have
        self.check_experts()
        self.check_filled(model)
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            pass
        model.name_or_path = str(path)
        return model, load_tokenizer(path)


def load_tokenizer(path: str | os.PathLike, progress: bool = False):
    """The tokenizer next to checkpoint `path` (a folder, or a `.gguf` file's converted copy), or
    None when there is none (a warning says so if its files cannot be loaded)."""
    from transformers import AutoTokenizer  # heavy, used here only

    path = resolve_checkpoint(path, progress) if Path(path).is_file() else Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        warnings.warn(f"{path}: the tokenizer files could not be loaded ({err})")
        return None


def load_checkpoint_dir(path: str | os.PathLike, method: str = "qdora", cfg: AdapterConfig | None = None,
                        dtype=None, device: str | torch.device = "cpu", progress: bool = True):
    """Build the model of checkpoint folder `path`, quantizing linear weights to NF4 shard by shard
    for `qlora`/`qdora`. Returns (model, tokenizer or None); adapters are not added here."""
    loader = CheckpointModel(path, cfg or AdapterConfig(method=method), dtype, device, progress)
    loader.fill()
    return loader.finish()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks (`model.model.layers` for Llama)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(model).__name__}: no decoder layer list found (expected model.model.layers)")
    return layers


def check_model_path(path: str | os.PathLike) -> None:
    """The checks of a model path that need no loading (run before slow work): it exists, and is a
    `.gguf` file or a folder with a config.json and readable safetensors headers."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a checkpoint folder or a .gguf file")
        return
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a transformers checkpoint folder or a .gguf file")
    CheckpointReader(path)


def resolve_checkpoint(path: str | os.PathLike, progress: bool = True) -> Path:
    """The checkpoint folder of `path`: the folder itself, or a `.gguf` file's converted copy."""
    check_model_path(path)
    path = Path(path)
    return convert_gguf(path, progress) if path.is_file() else path


def load_model(path: str | os.PathLike, method: str = "qdora", cfg: AdapterConfig | None = None,
               dtype=None, device: str | torch.device = "cpu", add: bool = True, progress: bool = True):
    """Load a model for fine-tuning with `method` and return `(model, tokenizer)`.

    `path`: a transformers checkpoint folder (safetensors, sharded or not) or a `.gguf` file.
    For `qlora`/`qdora` linear weights are quantized to NF4 shard by shard as they are read.
    `cfg` (an `AdapterConfig`; default: `AdapterConfig(method=method)`) chooses the adapters, added
    unless `add=False`. `dtype`: storage dtype of the unquantized tensors (`auto`: fp32 on CPU,
    the checkpoint's dtype on CUDA).
    """
    if cfg is not None and cfg.method != method and method != "qdora":
        raise ValueError(f"method={method!r} and cfg.method={cfg.method!r} disagree")
    cfg = cfg or AdapterConfig(method=method)
    path = resolve_checkpoint(path, progress)
    loader = CheckpointModel(path, cfg, dtype, device, progress)
    if add:
        plan_adapters(loader.model, cfg)  # every check of cfg against the model, before a weight is read
    loader.fill()
    model, tokenizer = loader.finish()
    if add:
        add_adapters(model, cfg, verbose=progress)
    return model, tokenizer


def stream_model(path: str | os.PathLike, cfg: AdapterConfig, dtype=None, device: str | torch.device = "cpu",
                 progress: bool = True, on_layer=None):
    """`load_model(path, cfg=cfg)` one decoder layer at a time, for a start that never needs the
    whole model at once: read a layer's tensors (quantizing them), add its adapters, hand it to
    `on_layer(layer)` (`qdora.train.fsdp.build_sharded` shards it there and keeps only its part), then
    the next layer; the tensors outside the layers (embeddings, final norm, head) come last.

    Adapters are drawn in the same order as `add_adapters` draws them on the whole model, so with
    `on_layer=None` the result is `load_model`'s bit for bit. `path`: a checkpoint folder (see
    `resolve_checkpoint` for a `.gguf` file). VeRA's projections are shared by all layers and need
    the whole model: they are not streamed."""
    if cfg.method == "full" or cfg.direction != "lora":
        raise ValueError(f"stream_model adds adapters layer by layer: method={cfg.method!r}, "
                         f"direction={cfg.direction!r} cannot be streamed (use load_model)")
    loader = CheckpointModel(path, cfg, dtype, device, progress)
    model = loader.model
    plan = plan_adapters(model, cfg)  # every check on the meta model, before anything is read
    if plan.left_out:
        warnings.warn(plan.left_out_message(), stacklevel=2)
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers) + "."
    keys: list[list[str]] = [[] for _ in layers]
    rest: list[str] = []
    for key in loader.reader.keys():
        name = loader.name_of[key]
        index = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
        (keys[int(index)] if index.isdigit() and int(index) < len(layers) else rest).append(key)
    for i, layer in enumerate(layers):
        loader.fill(keys[i])
        loader.check_filled(layer, f"{prefix}{i}.")
        loader.move_buffers(layer)
        apply_adapters(model, plan, within=lambda name, p=f"{prefix}{i}.": name.startswith(p))
        if on_layer is not None:
            on_layer(layer)
    loader.fill(rest)
    model, tokenizer = loader.finish()
    apply_adapters(model, plan, within=lambda name: not name.startswith(prefix))
    model.qdora_config = cfg
    if cfg.method != "full":
        route_save_pretrained(model)  # it writes the adapter, not the packed base
    if progress:
        print(param_report(model))
    return model, tokenizer
