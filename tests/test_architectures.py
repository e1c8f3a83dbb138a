"""The architectures people fine-tune now, as tiny random checkpoints built from transformers configs:
load to NF4, adapt, train, adapter files both ways, merge, FSDP layer discovery and the planner."""

import json

import pytest
import torch
from conftest import assert_close
from models import save_bpe_tokenizer

from qdora import AdapterConfig, QDoRALinear, load_adapter, load_model, merge_and_save, save_adapter
from qdora.data.examples import DEMO_DATA

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ARCHITECTURES = {
    # name: (config class, extra config fields, target modules)
    "llama": ("LlamaConfig", {}, LLAMA_TARGETS),
    "qwen2": ("Qwen2Config", {}, LLAMA_TARGETS),  # q/k/v carry biases
    "qwen3": ("Qwen3Config", {"head_dim": 16}, LLAMA_TARGETS),  # q/k norms
    "mistral": ("MistralConfig", {"sliding_window": None}, LLAMA_TARGETS),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16}, LLAMA_TARGETS),  # tied, soft-capped
    "phi3": ("Phi3Config", {"pad_token_id": 0}, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),  # fused
    "olmo2": ("Olmo2Config", {}, LLAMA_TARGETS),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4,
                                         "layer_types": ["sliding_attention", "full_attention"]},
                    LLAMA_TARGETS),  # q/k norms, a local and a global layer, scaled embeddings
}
IDS = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(9))


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def checkpoint(request, tmp_path_factory):
    name = request.param
    config_class, extra, targets = ARCHITECTURES[name]
    config = getattr(transformers, config_class)(**COMMON, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp(name) / "ckpt"
    model.save_pretrained(path)
    records = json.loads((DEMO_DATA / "arc_easy_train.json").read_text())[:8]
    save_bpe_tokenizer(path, [r["instruction"] + " " + r["output"] for r in records])
    return name, path, targets


def adapted(path, targets, method="qdora"):
    cfg = AdapterConfig(method=method, r=4, alpha=8, dropout=0.0, target_modules=targets)
    torch.manual_seed(1)
    model, tok = load_model(path, method=method, cfg=cfg, progress=False)
    with torch.no_grad():  # make the adapter matter
        for layer in model.modules():
            if isinstance(layer, QDoRALinear):
                layer.lora_B.normal_(0, 0.2)
                layer.magnitude_delta.normal_(0, 0.05)
    return model.eval(), tok


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def test_load_adapt_merge_and_reload(checkpoint, tmp_path):
    name, path, targets = checkpoint
    model, tok = adapted(path, targets)
    layers = [m for m in model.modules() if isinstance(m, QDoRALinear)]
    assert len(layers) == 2 * len(targets)
    if name == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.base_layer.bias is not None
    merge_and_save(model, tmp_path / "merged", tokenizer=tok, dtype=torch.float32)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    # fp32 merge of the same (dequantized NF4) weights: the same model up to fp32 rounding
    assert_close(logits(plain), logits(model), 1e-4, f"{name} merged logits")


def test_adapter_files_both_ways(checkpoint, tmp_path):
    name, path, targets = checkpoint
    model, _ = adapted(path, targets)
    reference = logits(model)
    for fmt in ("qdora", "peft"):
        save_adapter(model, tmp_path / fmt, format=fmt)
        fresh, _ = load_model(path, add=False, progress=False)
        load_adapter(fresh, tmp_path / fmt, verbose=False)
        assert_close(logits(fresh.eval()), reference, 1e-5, f"{name} {fmt} adapter")


def test_trains_and_shards_by_decoder_layer(checkpoint, tmp_path):
    from qdora.train.fsdp import decoder_layers
    from qdora.train.loop import TrainConfig, read_metrics, train
    name, path, targets = checkpoint
    records = json.loads((DEMO_DATA / "arc_easy_train.json").read_text())[:8]
    (tmp_path / "data.json").write_text(json.dumps(records))
    summary = train(TrainConfig(model=str(path), data=str(tmp_path / "data.json"), out=str(tmp_path / "run"),
                                r=4, alpha=8, lr=1e-2, max_steps=3, batch_size=2, cutoff_len=512, dropout=0.0,
                                target_modules=targets, progress=False))
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert len(losses) == 3 and all(map(torch.isfinite, map(torch.tensor, losses)))
    assert len(decoder_layers(summary["model"])) == 2


def test_the_planner_reads_the_checkpoint(checkpoint):
    from qdora.plan.memory import PlanConfig, plan, resolve_model
    name, path, targets = checkpoint
    shape = resolve_model(str(path))
    result = plan(shape, PlanConfig(target_modules=",".join(targets), seq_len=128, device="cpu"))
    assert result.total_bytes > 0


def test_a_checkpoint_without_the_base_model_prefix_loads_as_transformers_loads_it(tmp_path):
    # A `LlamaModel` checkpoint (keys `layers.0...`, no `model.` prefix) read as a causal LM with tied
    # embeddings: transformers adds the prefix on load, and so does qdora's loader.
    config = transformers.LlamaConfig(**COMMON, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaModel(config).save_pretrained(tmp_path / "ckpt")
    from safetensors import safe_open
    with safe_open(tmp_path / "ckpt" / "model.safetensors", framework="pt") as f:
        assert all(not k.startswith("model.") for k in f.keys())
    ours, _ = load_model(tmp_path / "ckpt", method="lora", add=False, progress=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert torch.equal(logits(ours.eval()), logits(theirs.eval()))


def test_the_streamed_start_builds_the_same_model(checkpoint):
    # What every FSDP rank builds, one decoder layer at a time, is load_model's model bit for bit.
    from qdora.models.loading import stream_model
    name, path, targets = checkpoint
    cfg = AdapterConfig(method="qdora", r=4, alpha=8, dropout=0.0, target_modules=targets)
    torch.manual_seed(3)
    whole, _ = load_model(path, cfg=cfg, progress=False)
    torch.manual_seed(3)
    streamed, _ = stream_model(path, cfg, progress=False)
    a, b = whole.state_dict(), streamed.state_dict()
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_an_architecture_without_linear_projections_is_named(tmp_path):
    from qdora import add_adapters
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64,
                                                                 n_positions=32))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*transformer.h.0.attn.c_attn is a Conv1D, not an "
                                         r"nn.Linear"):
        add_adapters(model, AdapterConfig(target_modules=("c_attn",)), verbose=False)
    from qdora.train.fsdp import decoder_layers
    with pytest.raises(ValueError, match="GPT2LMHeadModel: no decoder layer list found"):
        decoder_layers(model)
