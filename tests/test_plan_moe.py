"""The memory planner on mixtures of experts: the presets' shapes against transformers' own models, the
resident terms byte for byte against real adapted MoE models (experts in NF4, per-expert adapters,
the router), the peak against measured CPU training steps of scaled-down Qwen3-MoE, OLMoE and
Mixtral (within 15%, as the dense planner), what the targets mean on an MoE, and the command."""

import json

import bitsandbytes as bnb
import pytest
import torch
import transformers

import qdora
from qdora.cli import main
from qdora.core.layer import QDoRALinear
from qdora.eval.plan.validate import MOE, MOE_SHAPES, build_model, error, measure
from qdora.plan.memory import PRESETS, PlanConfig, plan, resolve_model, shape_from_config
from qdora.plan.report import format_plan, plan_to_dict

# The presets as transformers configs: the class and the config's own names for the experts.
ARCH = {"qwen3-30b-a3b": "Qwen3Moe", "olmoe-1b-7b": "Olmoe", "mixtral-8x7b": "Mixtral"}


def _config(key):
    s = PRESETS[key]
    kw = dict(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
              num_key_value_heads=s.kv_heads, vocab_size=s.vocab, tie_word_embeddings=s.tied_embeddings,
              num_experts_per_tok=s.experts_per_token)
    if key == "qwen3-30b-a3b":
        kw.update(head_dim=s.head_dim, num_experts=s.num_experts, moe_intermediate_size=s.moe_intermediate,
                  intermediate_size=s.intermediate, norm_topk_prob=True)
    elif key == "olmoe-1b-7b":
        kw.update(num_experts=s.num_experts, intermediate_size=s.moe_intermediate, norm_topk_prob=False)
    else:
        kw.update(num_local_experts=s.num_experts, intermediate_size=s.moe_intermediate)
    return getattr(transformers, f"{ARCH[key]}Config")(**kw)


@pytest.mark.parametrize("key", sorted(ARCH))
def test_moe_presets_match_transformers(key):
    """Parameter count of transformers' model on the meta device, and the shape read back from its config."""
    config = _config(key)
    with torch.device("meta"):
        model = getattr(transformers, f"{ARCH[key]}ForCausalLM")(config)
    s = PRESETS[key]
    assert s.params() == sum(p.numel() for p in model.parameters())
    back = shape_from_config(config, name=s.name)
    assert back == s
    experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    assert len(experts) == s.layers == s.moe_layers
    assert tuple(experts[0].gate_up_proj.shape) == (s.num_experts, 2 * s.moe_intermediate, s.hidden)


def test_published_totals_and_hub_names():
    # Qwen3-30B-A3B 30.5B, OLMoE-1B-7B 6.9B, Mixtral-8x7B 46.7B parameters, as their model cards say.
    assert round(PRESETS["qwen3-30b-a3b"].params() / 1e9, 1) == 30.5
    assert round(PRESETS["olmoe-1b-7b"].params() / 1e9, 1) == 6.9
    assert round(PRESETS["mixtral-8x7b"].params() / 1e9, 1) == 46.7
    for name, key in (("Qwen/Qwen3-30B-A3B", "qwen3-30b-a3b"), ("allenai/OLMoE-1B-7B-0924", "olmoe-1b-7b"),
                      ("mistralai/Mixtral-8x7B-v0.1", "mixtral-8x7b")):
        assert resolve_model(name) == PRESETS[key]


def test_moe_checkpoint_folder(tmp_path):
    """A checkpoint's config.json (as the planner reads it) gives the shape its config object gives."""
    _, config = _tiny("tiny-olmoe")
    config.save_pretrained(tmp_path)
    shape = resolve_model(str(tmp_path))
    assert shape == shape_from_config(config, name=tmp_path.name)
    assert (shape.num_experts, shape.experts_per_token, shape.moe_intermediate, shape.qk_norm, shape.norm_topk) == \
        (8, 4, 128, "full", False)


def _tiny(name):
    arch, kw = MOE_SHAPES[name]
    config = getattr(transformers, f"{arch}Config")(**kw, max_position_embeddings=256)
    torch.manual_seed(0)
    return getattr(transformers, f"{arch}ForCausalLM")(config), config


def _own_count(model):
    """Resident bytes by kind, read off the model's modules and tensors (not from the planner)."""
    nf4 = qstate = base = adapters = 0
    quantized = set()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            st = module.weight.quant_state
            nf4 += module.weight.untyped_storage().nbytes()
            quantized.add(module.weight.untyped_storage().data_ptr())
            qstate += st.absmax.nbytes + st.code.nbytes
            if st.nested:
                qstate += st.state2.absmax.nbytes + st.offset.nbytes + st.state2.code.nbytes
        elif isinstance(module, QDoRALinear):
            for t in (module.lora_A, module.lora_B, module.magnitude_delta, module.base_row_sq_norm):
                adapters += t.nbytes if t is not None else 0
    seen = set(quantized)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" in name or "magnitude_delta" in name or "base_row_sq_norm" in name:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            base += t.untyped_storage().nbytes()
    return {"nf4_weights": nf4, "quant_state": qstate, "base_weights": base, "adapters": adapters}


@pytest.mark.parametrize("name,method,targets,mag_only", [
    ("tiny-qwen3-moe", "qdora", "q_proj,k_proj,v_proj,o_proj,experts", ""),
    ("tiny-qwen3-moe", "qlora", "q_proj,k_proj,v_proj", ""),
    ("tiny-olmoe", "qdora", "q_proj,experts.down_proj", "experts.gate_up_proj,gate"),
    ("tiny-mixtral", "dora", "experts.gate_up_proj,v_proj,gate", ""),
    ("tiny-mixtral", "lora", "all", ""),
    ("tiny-qwen3-moe", "qlora", "gate,experts.down_proj", ""),
])
def test_moe_resident_terms_are_the_models_bytes(name, method, targets, mag_only):
    model, config = _tiny(name)
    cfg = PlanConfig(method=method, r=4, target_modules=targets, magnitude_only_modules=mag_only, device="cpu")
    adapter_targets = ("all-linear",) if targets == "all" else cfg.target_modules
    qdora.add_adapters(model, qdora.AdapterConfig(
        method=method, r=4, target_modules=adapter_targets, magnitude_only_modules=cfg.magnitude_only_modules,
        adapter_dtype="float32"), verbose=False)
    predicted = plan(shape_from_config(config, name=name), cfg)
    assert {k: predicted.terms[k] for k in _own_count(model)} == _own_count(model)
    trainable = sum(p.nbytes for p in model.parameters() if p.requires_grad)
    assert predicted.terms["optimizer_states"] == 2 * trainable          # AdamW: two fp32 states per element


@pytest.mark.parametrize("case", MOE[1:], ids=["qwen3-qdora-experts", "qwen3-qlora-attention", "olmoe-qdora-down",
                                               "mixtral-qlora-experts", "qwen3-qdora-router"])
def test_moe_layer_saved_tensors_are_what_autograd_keeps(case):
    """The planner's saved bytes of one MoE layer (router and experts) against the storages autograd
    keeps while that layer runs (saved-tensor hooks; parameters and storages saved before left out)."""
    from qdora.plan import moe
    from qdora.plan.memory import dims  # the planner's sizes, to call its MoE term alone
    model, shape = build_model(case)
    cfg = case.cfg
    block = model.model.layers[1].mlp        # layer 1: its input requires grad, as in every later layer
    kept = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    inside, saved = [False], {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in kept and ptr not in saved:
            saved[ptr] = t.untyped_storage().nbytes() if inside[0] else 0
        return t

    block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    block.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    ids = torch.randint(0, shape.vocab, (cfg.batch_size, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    assert sum(saved.values()) == moe.saved(dims(shape, cfg), shape, cfg)


# Measured on CPU (fp32) with the profiler, as tests/test_plan.py does for dense models: within 15%.
@pytest.mark.parametrize("case", [MOE[0], MOE[2], MOE[3], MOE[4], MOE[5]],
                         ids=["qwen3-qdora-experts-ckpt", "qwen3-qlora-attention", "olmoe-qdora-down",
                              "mixtral-qlora-experts", "qwen3-qdora-router"])
def test_moe_prediction_within_15_percent_of_measured_peak(case):
    row = measure(case)
    assert abs(error(row)) <= 0.15, row


def test_expert_targets_change_the_plan_as_the_model_does():
    """Adapting the experts adds exactly the adapters `add_adapters` makes (per expert, per projection)."""
    attention = "q_proj,k_proj,v_proj,o_proj"
    for name in ("tiny-qwen3-moe", "tiny-mixtral"):
        base = PlanConfig(method="qdora", r=8, device="cpu", target_modules=attention)
        model, config = _tiny(name)
        qdora.add_adapters(model, qdora.AdapterConfig(method="qdora", r=8, target_modules=("experts",),
                                                      adapter_dtype="float32"), verbose=False)
        expert_adapters = _own_count(model)["adapters"]
        shape = shape_from_config(config, name=name)
        a, b = plan(shape, base), plan(shape, base.replace(target_modules=attention + ",experts"))
        assert b.terms["adapters"] - a.terms["adapters"] == expert_adapters
        assert b.terms["nf4_weights"] == a.terms["nf4_weights"]          # experts in NF4 either way
        assert [v for k, v in b.details.items() if "adapters" in k] == [expert_adapters]


def test_default_targets_on_an_moe_mean_the_attention():
    """`qdora train`'s default targets (q,k,v,up,down): on an all-MoE model up_proj and down_proj name no
    layer (a bare projection name does not name experts), so the plan is that of q,k,v, with a note."""
    default = plan("Qwen3-30B-A3B", PlanConfig(method="qdora"))
    qkv = plan("Qwen3-30B-A3B", PlanConfig(method="qdora", target_modules="q_proj,k_proj,v_proj"))
    assert default.terms == qkv.terms and not qkv.notes
    assert len(default.notes) == 1 and "up_proj, down_proj name no layer of Qwen3-30B-A3B" in default.notes[0]
    assert "note: up_proj, down_proj" in format_plan(default) and plan_to_dict(default)["notes"] == list(default.notes)
    everything = plan("Mixtral-8x7B", PlanConfig(method="qlora", target_modules="all"))  # all-linear: attention
    assert everything.terms == plan("Mixtral-8x7B", PlanConfig(method="qlora",
                                                               target_modules="q_proj,k_proj,v_proj,o_proj")).terms


def test_moe_errors_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="target.s. up_proj name no layer of OLMoE-1B-7B.*drop up_proj"):
        plan("OLMoE-1B-7B", PlanConfig(target_modules="q_proj,up_proj"))
    with pytest.raises(ValueError, match="target.s. experts.down_proj.*Llama-3-8B has no experts"):
        plan("Llama-3-8B", PlanConfig(target_modules="q_proj,experts.down_proj"))
    with pytest.raises(ValueError, match="gpus=2: FSDP over an MoE .Mixtral-8x7B. is not planned; plan gpus=1"):
        plan("Mixtral-8x7B", PlanConfig(gpus=2))
    qwen = PRESETS["qwen3-30b-a3b"]
    with pytest.raises(ValueError, match="shared_experts=1"):
        plan(qwen.__class__(**{**qwen.__dict__, "shared_experts": 1}), PlanConfig())
    sparse = shape_from_config({**_config("qwen3-30b-a3b").to_dict(), "mlp_only_layers": [0, 1]}, name="q")
    assert sparse.dense_layers == (0, 1) and sparse.moe_layers == 46
    with pytest.raises(ValueError, match=r"dense MLP layers \[0, 1\]"):
        plan(sparse, PlanConfig())
    with pytest.raises(ValueError, match="unknown target module.*experts.gate_up_proj"):
        PlanConfig(target_modules="q_proj,expert")
    with pytest.raises(ValueError, match="target.s. gate: Llama-3-8B has no experts"):
        plan("Llama-3-8B", PlanConfig(target_modules="q_proj,gate"))
    with pytest.raises(ValueError, match="r=16 exceeds the router gate .8x4096.; use r <= 8 or leave gate out"):
        plan("Mixtral-8x7B", PlanConfig(r=16, target_modules="q_proj,gate"))


def test_cli_plan_moe(capsys):
    assert main(["plan", "--model", "Qwen3-30B-A3B", "--method", "qdora"]) == 0
    out = capsys.readouterr().out
    for line in ("48 MoE layers of 128 experts", "experts: 128 × 48 layers, NF4 weights (packed)",
                 "router: 48 layers × 128 × 2048, frozen", "note: up_proj, down_proj", "fits: 16 GB"):
        assert line in out, line
    assert main(["plan", "--model", "Qwen3-30B-A3B", "--method", "qdora", "--target-modules",
                 "q_proj,k_proj,v_proj,o_proj,experts", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["target_modules"][-2:] == ["experts.gate_up_proj", "experts.down_proj"]
    assert data["model"]["num_experts"] == 128 and not data["notes"]
    assert any("adapters" in k for k in data["details"])
    for model in ("OLMoE-1B-7B", "Mixtral-8x7B"):
        assert main(["plan", "--model", model, "--method", "qlora"]) == 0
        assert "fits:" in capsys.readouterr().out
