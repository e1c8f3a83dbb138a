"""The memory planner: its resident terms against the model's real tensors (byte for byte), its
peak against measured training steps (within 15%), presets against transformers' own parameter
counts, FSDP sharding arithmetic, and every error path."""

import json

import bitsandbytes as bnb
import pytest
import torch
from models import llama2_config, llama3_config
from transformers import LlamaConfig, LlamaForCausalLM

import qdora
from qdora.cli import main
from qdora.core.layer import QDoRALinear
from qdora.eval.plan.validate import Case, error, measure
from qdora.plan.memory import (
    ALLOCATOR_SLACK,
    CUDA_CONTEXT_BYTES,
    GIB,
    PRESETS,
    PlanConfig,
    plan,
    resolve_model,
    shape_from_config,
)
from qdora.plan.report import format_plan

# Published parameter counts of the presets' architectures, checked against transformers (meta device).
PUBLISHED = {"llama-2-7b": dict(rope_theta=1e4), "llama-3-8b": dict(rope_theta=5e5),
             "llama-3-70b": dict(rope_theta=5e5), "smollm2-135m": dict(rope_theta=1e5)}


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_preset_parameter_count_matches_transformers(key):
    s = PRESETS[key]
    config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         tie_word_embeddings=s.tied_embeddings, **PUBLISHED[key])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert s.params() == sum(p.numel() for p in model.parameters())


# Gemma 2's published configurations (transformers' Gemma2Config defaults: vocabulary 256,000, head_dim 256, a
# 4,096-token window, soft caps 50 and 30, tied embeddings).
GEMMA2 = {"gemma-2-2b": dict(num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, hidden_size=2304,
                             intermediate_size=9216),
          "gemma-2-9b": dict(num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, hidden_size=3584,
                             intermediate_size=14336, head_dim=256, query_pre_attn_scalar=224),
          "gemma-2-27b": dict(num_hidden_layers=46, num_attention_heads=32, num_key_value_heads=16, hidden_size=4608,
                              intermediate_size=36864, head_dim=128, query_pre_attn_scalar=144)}


@pytest.mark.parametrize("key", sorted(GEMMA2))
def test_gemma2_presets_match_transformers(key):
    """The shape read back from the config (four norms, window, both soft caps) and the parameter count of
    transformers' model on the meta device; the totals as the model cards give them (2.61B, 9.24B, 27.2B)."""
    import transformers

    config = transformers.Gemma2Config(**GEMMA2[key])
    s = PRESETS[key]
    assert shape_from_config(config, name=s.name) == s
    with torch.device("meta"):
        model = transformers.Gemma2ForCausalLM(config)
    assert s.params() == sum(p.numel() for p in model.parameters())
    assert round(s.params() / 1e9, 2 if key == "gemma-2-2b" else 1 if key == "gemma-2-27b" else 2) == \
        {"gemma-2-2b": 2.61, "gemma-2-9b": 9.24, "gemma-2-27b": 27.2}[key]
    assert resolve_model(f"google/{key}-it") == s


# Other dense families' published configurations (config.json), with their model cards' parameter totals.
DENSE = {"mistral-7b-v0.3": ("MistralConfig", dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                                                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                                   sliding_window=None, tie_word_embeddings=False), 7.25),
         "qwen2.5-7b": ("Qwen2Config", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                            num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                            tie_word_embeddings=False, use_sliding_window=False,
                                            sliding_window=131072), 7.62),
         "qwen3-8b": ("Qwen3Config", dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                                          num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                                          head_dim=128, tie_word_embeddings=False), 8.19)}


@pytest.mark.parametrize("key", sorted(DENSE))
def test_dense_presets_match_transformers(key):
    """Mistral-7B-v0.3, Qwen2.5-7B (q/k/v biases), Qwen3-8B (per-head q/k norms): the shape read back from the
    config, the parameter count of transformers' model on the meta device, and the published total."""
    import transformers

    config_class, fields, billions = DENSE[key]
    config = getattr(transformers, config_class)(**fields)
    s = PRESETS[key]
    assert shape_from_config(config, name=s.name) == s
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert s.params() == sum(p.numel() for p in model.parameters())
    assert round(s.params() / 1e9, 2) == billions


def test_known_totals():
    # Parameter counts as published: Llama-2-7B 6.74B, Llama-3-8B 8.03B, Llama-3-70B 70.6B.
    assert PRESETS["llama-2-7b"].params() == 6_738_415_616
    assert PRESETS["llama-3-8b"].params() == 8_030_261_248
    assert PRESETS["llama-3-70b"].params() == 70_553_706_496


def _own_count(model):
    """Independent byte count of the resident tensors, by kind, read off the model's modules."""
    nf4 = qstate = base = adapters = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            st = module.weight.quant_state
            nf4 += module.weight.untyped_storage().nbytes()
            qstate += st.absmax.nbytes + st.code.nbytes
            if st.nested:
                qstate += st.state2.absmax.nbytes + st.offset.nbytes + st.state2.code.nbytes
        elif isinstance(module, QDoRALinear):
            for t in (module.lora_A, module.lora_B, module.magnitude_delta, module.base_row_sq_norm):
                adapters += t.nbytes if t is not None else 0
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if ".base_layer.weight" in name and isinstance(t, bnb.nn.Params4bit) or "lora_" in name \
                or "magnitude_delta" in name or "base_row_sq_norm" in name:
            continue
        if isinstance(t, bnb.nn.Params4bit) or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        base += t.nbytes
    return {"nf4_weights": nf4, "quant_state": qstate, "base_weights": base, "adapters": adapters}


@pytest.mark.parametrize("make,method,r,targets,mag_only,dq", [
    (llama3_config, "qdora", 16, "q_proj,k_proj,v_proj,up_proj,down_proj", "", True),
    (llama2_config, "qlora", 8, "all", "", True),
    (llama3_config, "qdora", 4, "q_proj,v_proj", "o_proj", False),
    (lambda: llama2_config(tie_word_embeddings=True, hidden_size=96, intermediate_size=200), "dora", 16, "all", "",
     True),
    (llama3_config, "lora", 16, "down_proj", "", True),
    (llama3_config, "full", 16, "q_proj", "", True),
])
def test_resident_terms_are_the_models_bytes(make, method, r, targets, mag_only, dq):
    config = make()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    cfg = PlanConfig(method=method, r=r, target_modules=targets, magnitude_only_modules=mag_only, device="cpu",
                     double_quant=dq)
    qdora.add_adapters(model, qdora.AdapterConfig(
        method=method, r=r, target_modules=cfg.target_modules, magnitude_only_modules=cfg.magnitude_only_modules,
        adapter_dtype="float32", double_quant=dq), verbose=False)
    predicted = plan(shape_from_config(config), cfg)
    assert {k: predicted.terms[k] for k in _own_count(model)} == _own_count(model)
    if method == "full":  # AdamW keeps two fp32 states per weight; gradients at the step are the weights
        params = sum(p.nbytes for p in model.parameters())
        assert predicted.terms["optimizer_states"] == 2 * params


# Measured on CPU (fp32) with the profiler: the error stays within 15% (the bound); the
# validation script's table in the README shows the spread over more and larger cases.
@pytest.mark.parametrize("case", [
    Case("tiny-llama3", PlanConfig(method="qdora", r=16, batch_size=2, seq_len=64, device="cpu")),
    Case("tiny-llama3", PlanConfig(method="qdora", r=16, batch_size=2, seq_len=64, device="cpu",
                                   gradient_checkpointing=False)),
    Case("tiny-llama3", PlanConfig(method="lora", r=8, batch_size=1, seq_len=96, device="cpu", dropout=0.0,
                                   gradient_checkpointing=False)),
    Case("tiny-llama2", PlanConfig(method="full", batch_size=1, seq_len=128, device="cpu",
                                   gradient_checkpointing=False)),
], ids=["qdora-ckpt", "qdora-nockpt", "lora-nodropout", "full"])
def test_prediction_within_15_percent_of_measured_peak(case):
    row = measure(case)
    assert abs(error(row)) <= 0.15, row


def test_published_allocated_figures():
    """Answer.AI's fsdp_qlora benchmarks (benchmarks_03_2024.md, 2x3090, FSDP, Llama-2-7B LoRA r=64,
    batch 1) report peak *allocated* memory, the quantity the planner's tensor bytes predict:
    8.28 GiB at 512 tokens and 9.16 GiB at 2048. Their code (2024 transformers, FSDP1, PEFT) is not
    ours, so the bound is loose: 10%."""
    from qdora.eval.plan.validate import PUBLISHED, published_table
    rows = [(cfg, model, figure) for _, _, model, cfg, figure, reads in PUBLISHED if reads == "peak allocated"]
    assert len(rows) == 2
    for cfg, model, figure in rows:
        assert abs(plan(model, cfg).tensor_bytes / 2**30 / figure - 1) < 0.10
    assert published_table().count("\n") == len(PUBLISHED) + 1


def test_fsdp_shards_what_it_shards_and_names_its_buffers():
    one = plan("Llama-3-70B", PlanConfig(method="qdora", r=64, gpus=1))
    for n in (2, 4):
        p = plan("Llama-3-70B", PlanConfig(method="qdora", r=64, gpus=n))
        assert p.terms["nf4_weights"] == -(-one.terms["nf4_weights"] // n)
        assert p.terms["optimizer_states"] == -(-one.terms["optimizer_states"] // n)
        assert p.terms["quant_state"] == one.terms["quant_state"]      # replicated on every rank
        assert p.terms["activations"] == one.terms["activations"]      # each rank runs its own batch
        assert set(p.details) == {"fsdp: 2 decoder layers unsharded (computing + prefetched)",
                                  "fsdp: root unsharded (embeddings, final norm, lm_head)",
                                  "fsdp: one layer's gradients before reduce-scatter (fp32)"}
        assert p.terms["fsdp_buffers"] == sum(p.details.values())
    assert one.terms["fsdp_buffers"] == 0


def test_fsdp_start_streams_so_70b_fits_two_24gb_cards_with_offload():
    """`qdora.train.fsdp.build_sharded` streams the checkpoint layer by layer on every rank: the start
    holds this rank's shards, every quantization state, and one layer or the root whole. For
    Llama-3-70B with CPU offload both the start and the step fit a 24 GB card; without offload the
    shards (35 GB of NF4 over 2 GPUs) do not."""
    from qdora.core import nf4
    from qdora.plan.memory import CHECKSUM_CHUNK, QUANT_CHUNK
    from qdora.train import fsdp
    assert (QUANT_CHUNK, CHECKSUM_CHUNK) == (nf4.QUANT_CHUNK, fsdp.CHECKSUM_CHUNK)
    one = plan("Llama-3-70B", PlanConfig(method="qdora", r=64, gpus=1))
    assert one.start_bytes == 0 and one.start_total_bytes == 0
    shape = resolve_model("Llama-3-70B")
    root = 2 * shape.vocab * shape.hidden * 2 + shape.hidden * 2               # bf16 embeddings, head, norm
    offloaded = plan("Llama-3-70B", PlanConfig(method="qdora", r=64, gpus=2, cpu_offload=True))
    # Nothing sharded stays on the GPU: the quantization states, the root whole and its half being cut.
    assert offloaded.start_bytes > one.terms["quant_state"] + root + root // 2
    assert offloaded.start_bytes < one.terms["quant_state"] + root + root // 2 + 2**30
    assert offloaded.start_total_bytes == (offloaded.start_bytes + CUDA_CONTEXT_BYTES
                                           + int(ALLOCATOR_SLACK * offloaded.start_bytes))
    assert offloaded.fits(24) and "24 GB yes" in format_plan(offloaded)
    assert "start, per GPU" in format_plan(offloaded)
    for n in (2, 4, 8):  # without offload the start holds this rank's shards: less with more GPUs
        p = plan("Llama-3-70B", PlanConfig(method="qdora", r=64, gpus=n))
        assert p.start_bytes < p.tensor_bytes                     # the step holds all of that and more
        assert p.start_bytes > one.terms["nf4_weights"] // n
    assert not plan("Llama-3-70B", PlanConfig(method="qdora", r=64, gpus=2)).fits(24)


def test_more_tokens_more_memory_and_checkpointing_saves():
    base = PlanConfig(method="qdora", r=16, seq_len=1024)
    a = plan("Llama-3-8B", base)
    assert plan("Llama-3-8B", base.replace(seq_len=2048)).total_bytes > a.total_bytes
    assert plan("Llama-3-8B", base.replace(batch_size=4)).total_bytes > a.total_bytes
    assert plan("Llama-3-8B", base.replace(gradient_checkpointing=False)).total_bytes > a.total_bytes
    assert plan("Llama-3-8B", base.replace(method="full")).total_bytes > 4 * a.total_bytes
    assert a.terms["cuda_context"] > 0 and a.fits(24) and not plan("Llama-3-70B", base).fits(24)


def test_model_from_checkpoint_folder(tmp_path):
    config = llama3_config(num_hidden_layers=3)
    config.save_pretrained(tmp_path)
    shape = resolve_model(str(tmp_path))
    assert (shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.kv_heads, shape.vocab) == \
        (64, 224, 3, 8, 2, 1024)
    assert resolve_model("meta-llama/Meta-Llama-3-8B") == PRESETS["llama-3-8b"]


def test_norms_qk_norms_and_sliding_windows_read_from_the_config(tmp_path):
    """Gemma 3's four norms a layer, per-head q/k norms and window (the config object and its config.json alike),
    and the windows that configs carry but no layer uses; the norm weights counted as transformers counts them."""
    import transformers

    gemma3 = transformers.Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           sliding_window=32, layer_types=["sliding_attention", "full_attention"])
    gemma3.save_pretrained(tmp_path)
    for shape in (shape_from_config(gemma3), resolve_model(str(tmp_path))):
        assert (shape.norms, shape.qk_norm, shape.sliding_window) == (4, "head", 32)
    with torch.device("meta"):
        model = transformers.Gemma3ForCausalLM(gemma3)
    assert shape_from_config(gemma3).params() == sum(p.numel() for p in model.parameters())
    full = transformers.Gemma3TextConfig(sliding_window=32, num_hidden_layers=2, layer_types=["full_attention"] * 2)
    assert shape_from_config(full).sliding_window == 0
    assert shape_from_config(transformers.Qwen2Config(sliding_window=4096)).sliding_window == 0  # not used
    assert shape_from_config(transformers.MistralConfig(sliding_window=4096)).sliding_window == 4096
    assert (shape_from_config(llama3_config()).norms, shape_from_config(llama3_config()).sliding_window) == (2, 0)
    gemma2 = transformers.Gemma2Config(num_hidden_layers=2)  # soft-capped scores and logits by default
    assert (shape_from_config(gemma2).softcap_attention, shape_from_config(gemma2).softcap_logits) == (True, True)
    assert not (shape_from_config(gemma3).softcap_attention or shape_from_config(gemma3).softcap_logits)
    uncapped = transformers.Gemma2Config(num_hidden_layers=2, attn_logit_softcapping=None,
                                         final_logit_softcapping=None)
    assert not (shape_from_config(uncapped).softcap_attention or shape_from_config(uncapped).softcap_logits)


def test_errors_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_model("Llama-9-1B")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ValueError, match="lacks intermediate_size"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="(?s)method=.qdoora.*batch_size=0.*unknown target"):
        PlanConfig(method="qdoora", batch_size=0, target_modules="q_proj,lm_head")
    with pytest.raises(ValueError, match="paged_adamw_8bit' needs device='cuda'"):
        PlanConfig(optimizer="paged_adamw_8bit", device="cpu")
    with pytest.raises(ValueError, match="magnitude_only_modules=.* needs a DoRA method"):
        PlanConfig(method="qlora", magnitude_only_modules="o_proj")


def test_cli_plan(capsys):
    assert main(["plan", "--model", "Llama-3-8B", "--method", "qdora", "--r", "64", "--seq-len", "2048",
                 "--batch-size", "1", "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    for line in ("NF4 weights", "quantization state", "adapters", "gradients", "optimizer states",
                 "activations", "logits / loss", "temporaries", "CUDA context", "fits: 16 GB", "24 GB yes"):
        assert line in out
    assert main(["plan", "--model", "Llama-3-70B", "--gpus", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["terms"]["fsdp_buffers"] > 0 and data["config"]["gpus"] == 2
    assert main(["plan", "--model", "nope"]) == 2
    assert "neither a preset" in capsys.readouterr().err


def test_plan_config_from_an_adapter_config():
    """A plan built from an AdapterConfig plans that adapter: the same terms as the setting given
    field by field, and AdapterConfig's own checks reject a bad adapter field."""
    from qdora.core.config import AdapterConfig
    adapter = AdapterConfig(method="qdora", r=8, target_modules=("q_proj", "v_proj"), adapter_dtype="float32",
                            double_quant=False, norm="exact")
    got = plan("Llama-3-8B", PlanConfig.from_adapter(adapter, seq_len=1024, device="cpu"))
    want = plan("Llama-3-8B", PlanConfig(method="qdora", r=8, target_modules="q_proj,v_proj", adapter_dtype="float32",
                                         double_quant=False, norm="exact", seq_len=1024, device="cpu"))
    assert got.terms == want.terms and got.terms["adapters"] > 0
    with pytest.raises(ValueError, match="unknown plan setting"):
        PlanConfig.from_adapter(adapter, seq_length=1024)
    with pytest.raises(ValueError, match="(?s)invalid plan setting.*r=0 must be a positive integer"):
        PlanConfig(r=0)


def test_fits_only_with_the_margin_the_planners_error_needs():
    from qdora.plan.config import FIT_MARGIN
    from qdora.plan.report import plan_to_dict
    p = plan("Llama-3-8B", PlanConfig(method="qdora", r=64, seq_len=2048, batch_size=4, grad_accum=4))
    assert (1 - FIT_MARGIN) * 24 * GIB < p.total_bytes <= 24 * GIB          # 23.47 GiB (docs/planner.md)
    assert [p.verdict(gb) for gb in (16, 24, 48)] == ["no", "tight", "yes"] and not p.fits(24) and p.fits(48)
    text = format_plan(p)
    assert "fits: 16 GB no  24 GB tight  48 GB yes" in text and "tight: the plan is within 20% of the card" in text
    assert plan_to_dict(p)["fits"]["24"] == "tight"


# ---- the chunked loss (qdora.chunked_loss, qdora train's default) ----------------------------------

def test_chunked_loss_term_is_its_formula():
    """Llama-3-8B on CUDA (bf16), 1 × 2048 tokens: N = 2047 rows predict a label, the default chunk is
    523 tokens (256 MiB of fp32 logits); the term replaces the whole logits' T·V·(2 + 4 + 4) and 3·T·V·4."""
    from qdora.core.loss import default_chunk_tokens
    from qdora.plan.memory import chunked_loss_bytes, dims
    shape = resolve_model("Llama-3-8B")
    cfg = PlanConfig(method="qdora", r=64, seq_len=2048, chunked_loss=True)
    d = dims(shape, cfg)
    N, c, V, h, T = 2047, default_chunk_tokens(shape.vocab), shape.vocab, shape.hidden, 2048
    assert c == 523
    kept = N * h * 2 + N * 4 + N * 8 + 2 * N * 8                 # gathered rows, lse, labels, row indices
    forward = kept + T * h * 2 + c * V * 6                        # + the norm's output, a chunk's bf16 + fp32 logits
    backward = kept + N * h * 2 + c * V * 6 + c * h * 2          # + dh, a recomputed chunk, its dz·W
    assert chunked_loss_bytes(d, shape, cfg) == (forward, backward)
    whole, chunked = plan(shape, cfg.replace(chunked_loss=False)), plan(shape, cfg)
    assert whole.terms["logits_loss"] / GIB > 2.9 and chunked.terms["logits_loss"] / GIB < 0.5
    assert chunked.total_bytes < whole.total_bytes
    # a chunk is capped at the rows there are; a smaller chunk, a smaller term
    small = plan(shape, cfg.replace(seq_len=256))
    assert chunked_loss_bytes(dims(shape, small.config), shape, small.config)[0] < 255 * V * 6 + 256 * h * 20
    assert chunked_loss_bytes(d, shape, cfg.replace(loss_chunk_tokens=64))[1] < backward


def test_gemma3_layout_within_15_percent_of_measured_peak():
    """Gemma 3's layout (`eval/plan/validate.py --only gemma`): four norms a layer, per-head q/k norms, GELU-tanh,
    scaled embeddings, sliding-window layers run by qdora_sdpa's blocks in training."""
    case = Case("small-gemma3", PlanConfig(method="qdora", r=16, batch_size=1, seq_len=256, device="cpu",
                                           chunked_loss=True, target_modules="all"))
    row = measure(case)
    assert abs(error(row)) <= 0.15, row


def test_gemma2_layout_within_5_percent_of_measured_peak():
    """Gemma 2's layout (`eval/plan/validate.py --only gemma`): soft-capped scores run by qdora_softcap in 8 tiles of
    128 queries (4 MiB of scores each), and soft-capped logits, whose `tanh` the chunked loss's backward holds beside
    its chunk. Measured −0.1%; without the logits' term the plan read −5.2%. On transformers' eager attention, whose
    scores the plan does not model, the same step measured 158.8 MiB against 49.1."""
    case = Case("small-gemma2", PlanConfig(method="qdora", r=16, batch_size=1, seq_len=1024, device="cpu",
                                           chunked_loss=True, target_modules="all"))
    row = measure(case)
    assert abs(error(row)) <= 0.05, row


# A large vocabulary on a narrow model, so that the loss is the step's peak (eval/plan/validate.py --only chunked).
@pytest.mark.parametrize("chunk", [0, 128], ids=["default-chunk", "chunk-128"])
def test_chunked_loss_within_15_percent_of_measured_peak(chunk):
    case = Case("vocab-llama3", PlanConfig(method="qdora", r=16, batch_size=1, seq_len=384, device="cpu",
                                           chunked_loss=True, loss_chunk_tokens=chunk))
    row = measure(case)
    assert row["predicted_phase"] in ("forward end (loss)", "loss backward"), row
    assert abs(error(row)) <= 0.15, row


def test_plan_reads_the_chunked_loss_from_a_train_config(tmp_path, capsys):
    """`qdora plan --config RUN/train_config.json` plans the run's loss (train's default: chunked; a
    --no-chunked-loss run's whole logits); without it, the plan is the whole-logits one unless --chunked-loss."""
    import dataclasses

    from qdora.train.config import TrainConfig
    run = TrainConfig(model="Llama-3-8B", data="data.jsonl", out="run", cutoff_len=1024, method="qdora", r=64)
    assert run.chunked_loss
    path = tmp_path / "train_config.json"
    path.write_text(json.dumps(dataclasses.asdict(run)))
    assert main(["plan", "--config", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["chunked_loss"] is True and data["config"]["loss_chunk_tokens"] == 0
    cfg = PlanConfig(**data["config"])
    assert data["terms"] == plan("Llama-3-8B", cfg).terms and cfg.seq_len == 1024 and cfg.r == 64
    path.write_text(json.dumps(dataclasses.asdict(dataclasses.replace(run, loss_chunk_tokens=128))))
    assert main(["plan", "--config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["loss_chunk_tokens"] == 128

    whole = plan("Llama-3-8B", cfg.replace(chunked_loss=False))
    assert whole.terms["logits_loss"] > data["terms"]["logits_loss"]
    assert whole.total_bytes > sum(data["terms"].values())
    path.write_text(json.dumps(dataclasses.asdict(dataclasses.replace(run, chunked_loss=False))))
    assert main(["plan", "--config", str(path), "--json"]) == 0  # a --no-chunked-loss run: the whole logits
    assert json.loads(capsys.readouterr().out)["terms"] == whole.terms

    # PlanConfig's default: the whole-logits plan of before (the documented figures); --chunked-loss: qdora train's
    today = plan("Llama-3-8B", PlanConfig(r=64, seq_len=1024))
    assert not PlanConfig().chunked_loss and today.terms["logits_loss"] > 0
    for extra, want in (([], today), (["--chunked-loss"], plan("Llama-3-8B", PlanConfig(r=64, seq_len=1024,
                                                                                         chunked_loss=True)))):
        assert main(["plan", "--model", "Llama-3-8B", "--r", "64", "--seq-len", "1024", *extra, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["terms"] == want.terms, extra


def test_chunked_loss_settings_are_checked_as_train_checks_them():
    with pytest.raises(ValueError, match=r"loss_chunk_tokens=-1 must be an integer >= 1"):
        PlanConfig(chunked_loss=True, loss_chunk_tokens=-1)
    with pytest.raises(ValueError, match=r"loss_chunk_tokens=True must be an integer"):
        PlanConfig(chunked_loss=True, loss_chunk_tokens=True)
    with pytest.raises(ValueError, match="which --no-chunked-loss turns off"):
        PlanConfig(loss_chunk_tokens=64)
