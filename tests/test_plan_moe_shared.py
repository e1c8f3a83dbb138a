"""The memory planner on mixtures of experts with shared experts and dense layers (Qwen2-MoE, Qwen3-MoE with
`mlp_only_layers`, GLM-4-MoE with `first_k_dense_replace`; DeepSeek-V3's MoE layers): parameter counts
against transformers' own models, the resident terms and the adapters `add_adapters` makes byte for byte,
each layer's saved tensors against what autograd keeps, the peak against measured CPU steps, and what the
targets adapt on such a model."""

import warnings
import weakref

import pytest
import torch
import transformers
from test_plan_moe import _own_count, _tiny

import qdora
from qdora.eval.plan.validate import MOE_SHARED, error, measure
from qdora.plan.memory import PRESETS, PlanConfig, plan, resolve_model, shape_from_config

SHARED = ("tiny-qwen2-moe", "tiny-qwen3-moe-dense", "tiny-glm4-moe")


def _meta_params(config):
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny-qwen2-moe", "tiny-qwen3-moe-dense"])
def test_shared_experts_and_dense_layers_are_planned(name, tmp_path):
    """A Qwen2-MoE checkpoint folder (a shared expert in every MoE layer) and a Qwen3-MoE one with a dense
    first layer (`mlp_only_layers`) are planned, no longer refused as 'routed experts only'."""
    _, config = _tiny(name)
    config.save_pretrained(tmp_path)
    shape = resolve_model(str(tmp_path))
    assert shape.params() == _meta_params(config)
    p = plan(shape, PlanConfig(method="qdora", target_modules="q_proj,k_proj,v_proj,experts", device="cpu"))
    assert p.total_bytes > 0


def _kind(shape, cfg, index):
    """The planner's sizes of decoder layer `index`'s kind."""
    from qdora.plan.memory import dims  # the planner's sizes, to call its per-layer term alone
    return dims(shape, cfg, index not in shape.dense_layers)


CASES = [  # (model, method, targets, magnitude-only, dropout)
    ("tiny-qwen2-moe", "qdora", "q_proj,k_proj,v_proj,up_proj,down_proj", "", 0.05),       # the defaults
    ("tiny-qwen2-moe", "qlora", "q_proj,v_proj,experts,shared_expert.gate_proj", "", 0.0),
    ("tiny-qwen2-moe", "qdora", "gate,up_proj,shared_expert_gate", "shared_expert.down_proj", 0.0),
    ("tiny-qwen2-moe", "qlora", "all-linear", "", 0.05),
    ("tiny-qwen3-moe-dense", "qdora", "q_proj,k_proj,v_proj,o_proj,experts,up_proj,down_proj", "", 0.05),
    ("tiny-qwen3-moe-dense", "qdora", "all-linear,experts", "", 0.0),
    ("tiny-glm4-moe", "qdora", "q_proj,k_proj,v_proj,up_proj,down_proj", "", 0.05),
    ("tiny-glm4-moe", "qdora", "q_proj,v_proj,experts,gate,shared_experts.down_proj", "", 0.05),
    ("tiny-glm4-moe", "qdora", "all-linear", "gate", 0.0),
    ("tiny-qwen2-moe", "qdora", "all-linear", "", 0.05, 8),   # its shared_expert_gate (1 × H) left frozen, in NF4
]
IDS = ["qwen2-defaults", "qwen2-qlora-shared-gate-proj", "qwen2-router-shared-gate", "qwen2-qlora-all",
       "qwen3-dense-experts-mlp", "qwen3-dense-all-experts", "glm4-defaults", "glm4-router-shared-down",
       "glm4-all-router-magnitude", "qwen2-all-r8"]


def _adapted(name, method, targets, mag_only, dropout, r=1):
    model, config = _tiny(name)
    warnings.filterwarnings("ignore", "all-linear left")  # (said by the plan's note too)
    cfg = PlanConfig(method=method, r=r, target_modules=targets, magnitude_only_modules=mag_only, dropout=dropout,
                     batch_size=2, seq_len=64, device="cpu", gradient_checkpointing=False)
    qdora.add_adapters(model, qdora.AdapterConfig(
        method=method, r=r, dropout=dropout, target_modules=cfg.target_modules,
        magnitude_only_modules=cfg.magnitude_only_modules, adapter_dtype="float32"), verbose=False)
    return model, shape_from_config(config, name=name), cfg


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_resident_terms_and_adapters_are_the_models(case):
    """NF4 data and state, unquantized weights and buffers, adapters byte for byte; the optimizer's states are
    those of the parameters `add_adapters` made trainable (r=1: Qwen2-MoE's shared_expert_gate is 1 × H)."""
    model, shape, cfg = _adapted(*case)
    predicted = plan(shape, cfg)
    assert {k: predicted.terms[k] for k in _own_count(model)} == _own_count(model)
    trainable = sum(p.nbytes for p in model.parameters() if p.requires_grad)
    assert predicted.terms["optimizer_states"] == 2 * trainable


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_each_mlps_saved_tensors_are_what_autograd_keeps(case):
    """The planner's saved bytes of each layer's `mlp` (a dense MLP, or an MoE block: router, experts, shared
    MLP and its gate) against the storages autograd keeps while it runs (saved-tensor hooks; parameters and
    storages saved before left out): exactly, in every layer whose input needs a gradient (layer 0's does
    only when its attention is adapted; the planner counts it as the others)."""
    from qdora.plan.memory import mlp_saved
    model, shape, cfg = _adapted(*case)
    kept = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    inside, saved = [None], []

    def pack(t):
        saved.append((inside[0], weakref.ref(t)))
        return t

    for index, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda *_, i=index: inside.__setitem__(0, i))
        layer.mlp.register_forward_hook(lambda *_: inside.__setitem__(0, None))
    ids = torch.randint(0, shape.vocab, (cfg.batch_size, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    alive = {}  # what stays saved once the forward is done (a router's discarded branches free theirs)
    for index, ref in saved:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in kept:
            alive.setdefault(t.untyped_storage().data_ptr(), (index, t.untyped_storage().nbytes()))
    assert loss.grad_fn is not None
    attention = {"q_proj", "k_proj", "v_proj", "o_proj"} & _kind(shape, cfg, 0).direction
    layers = range(0 if attention else 1, shape.layers)
    measured = [sum(n for i, n in alive.values() if i == index) for index in layers]
    assert measured == [mlp_saved(_kind(shape, cfg, i), shape, cfg) for i in layers]
    assert {i in shape.dense_layers for i in layers} == ({True, False} if shape.dense_layers else {False})


# The presets' published configurations (their config.json files), as transformers configs.
PUBLISHED = {
    "qwen1.5-moe-a2.7b": lambda: transformers.Qwen2MoeConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        vocab_size=151936, num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408, norm_topk_prob=False,
        shared_expert_intermediate_size=5632, decoder_sparse_step=1, tie_word_embeddings=False),
    "glm-4.5-air": lambda: transformers.Glm4MoeConfig(
        hidden_size=4096, intermediate_size=10944, num_hidden_layers=46, num_attention_heads=96, num_key_value_heads=8,
        head_dim=128, vocab_size=151552, n_routed_experts=128, n_shared_experts=1, num_experts_per_tok=8,
        moe_intermediate_size=1408, first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
        partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=False, tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", [*SHARED, *PUBLISHED])
def test_parameter_counts_match_transformers(name):
    """`ModelShape.params` against transformers' model built on the meta device; the shape read back from the
    config object, from its dict (a config.json), and from a hub config.json that leaves defaults out."""
    config = PUBLISHED[name]() if name in PUBLISHED else _tiny(name)[1]
    shape = PRESETS[name] if name in PUBLISHED else shape_from_config(config, name=name)
    assert shape.params() == _meta_params(config)
    data = config.to_dict()
    hub = {k: v for k, v in data.items() if k not in ("qkv_bias", "rope_parameters")}  # defaults left out
    hub["partial_rotary_factor"] = data.get("rope_parameters", {}).get("partial_rotary_factor", 1.0)
    assert shape_from_config(config, name=shape.name) == shape_from_config(data, name=shape.name) == \
        shape_from_config(hub, name=shape.name) == shape
    if name in PUBLISHED:  # as their model cards say: 14.3B; 106B (and its MTP layer, not loaded by transformers)
        assert resolve_model({"qwen1.5-moe-a2.7b": "Qwen/Qwen1.5-MoE-A2.7B", "glm-4.5-air": "zai-org/GLM-4.5-Air"}[
            name]) == shape
        assert f"{shape.params() / 1e9:.1f}" == {"qwen1.5-moe-a2.7b": "14.3", "glm-4.5-air": "106.9"}[name]


def test_deepseek_v3_latent_attention_is_refused_its_moe_layers_read(tmp_path, capsys):
    """DeepSeek-V3's multi-head latent attention is not modeled: planning it is refused in one line naming
    it; its MoE layers (a dense first layer, shared experts, sigmoid routing in groups) are read, and every
    parameter outside the attention counted as transformers' model has it."""
    from qdora.cli import main
    config = transformers.DeepseekV3Config(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
        first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16,
        qk_nope_head_dim=32, v_head_dim=32)
    shape = shape_from_config(config, name="tiny-deepseek-v3")
    assert (shape.attention, shape.dense_layers, shape.shared_intermediate, shape.shared_gate, shape.router_groups) \
        == ("mla", (0,), 256, False, (2, 1))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    outside = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." not in n)
    assert shape.params(attention=False) == outside
    with pytest.raises(ValueError, match="multi-head latent attention .*kv_lora_rank.* is not planned"):
        plan(shape, PlanConfig())
    config.save_pretrained(tmp_path)
    assert main(["plan", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "multi-head latent attention" in err


def test_targets_adapt_what_add_adapters_adapts():
    """A bare up_proj, down_proj names the shared MLP's and the dense layers' linears (a dotted suffix), so
    `qdora train`'s default targets adapt them (no note); `shared_expert.<proj>` names the shared MLP alone;
    all-linear adapts every linear, Qwen2-MoE's shared_expert_gate (1 × H) too, which no rank above 1 fits:
    the planner refuses it as add_adapters does."""
    qwen, glm = PRESETS["qwen1.5-moe-a2.7b"], PRESETS["glm-4.5-air"]
    default = plan(qwen, PlanConfig(method="qdora"))
    named = plan(qwen, PlanConfig(method="qdora", target_modules="q_proj,k_proj,v_proj,shared_expert.up_proj,"
                                                                 "shared_expert.down_proj"))
    assert not default.notes and default.terms == named.terms
    qkv = plan(glm, PlanConfig(method="qdora", target_modules="q_proj,k_proj,v_proj"))
    mlp = plan(glm, PlanConfig(method="qdora", target_modules="q_proj,k_proj,v_proj,up_proj,down_proj"))
    h, i, si, r = glm.hidden, glm.intermediate, glm.shared_intermediate, 16
    per = lambda o, n: (r * (o + n) + o) * 4 + o * 4  # noqa: E731  (A, B, m in fp32 and the norm buffer)
    assert mlp.terms["adapters"] - qkv.terms["adapters"] == \
        45 * (per(si, h) + per(h, si)) + 1 * (per(i, h) + per(h, i))  # 45 MoE layers' shared MLP, 1 dense layer's
    every = plan(qwen, PlanConfig(method="qdora", target_modules="all"))  # the gate left frozen, as add_adapters does
    assert every.terms == plan(qwen, PlanConfig(method="qdora", target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,"
                                                                              "up_proj,down_proj")).terms
    assert "all-linear leaves shared_expert_gate frozen: it cannot take r=16" in every.notes[0]
    with pytest.raises(ValueError, match=r"r=16 exceeds shared_expert_gate \(1x2048\)"):   # named: refused
        plan(qwen, PlanConfig(method="qdora", target_modules="q_proj,shared_expert_gate"))
    model, _ = _tiny("tiny-qwen2-moe")
    with pytest.raises(ValueError, match=r"r=16 exceeds model.layers.0.mlp.shared_expert_gate \(1x256\)"):
        qdora.add_adapters(model, qdora.AdapterConfig(r=16, target_modules=("q_proj", "shared_expert_gate")),
                           verbose=False)
    with pytest.warns(UserWarning, match="all-linear left 2 linear module.s. frozen that cannot take r=16"):
        qdora.add_adapters(model, qdora.AdapterConfig(r=16, target_modules=("all-linear",)), verbose=False)
    with pytest.raises(ValueError, match="target.s. shared_expert.up_proj name no layer of GLM-4.5-Air"):
        plan(glm, PlanConfig(target_modules="q_proj,shared_expert.up_proj"))
    everything = plan(glm, PlanConfig(method="qlora", target_modules="all"))
    assert everything.terms == plan(glm, PlanConfig(method="qlora", target_modules=",".join(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))).terms


# Measured on CPU (fp32) with the profiler, as tests/test_plan_moe.py does: within 15% (docs/planner.md).
@pytest.mark.parametrize("case", MOE_SHARED, ids=["qwen2-qdora", "qwen2-qlora-ckpt", "qwen3-dense-qdora", "glm4-qdora",
                                                  "glm4-qdora-ckpt", "glm4-qlora-all"])
def test_prediction_within_15_percent_of_measured_peak(case):
    row = measure(case)
    assert abs(error(row)) <= 0.15, row


def test_cli_plans_the_presets(capsys):
    from qdora.cli import main
    assert main(["plan", "--model", "GLM-4.5-Air", "--method", "qdora", "--target-modules",
                 "q_proj,k_proj,v_proj,o_proj,experts"]) == 0
    out = capsys.readouterr().out
    for line in ("106.85B parameters", "45 MoE layers of 128 experts (intermediate 1408, top-8 per token; a shared "
                 "MLP of intermediate 1408), 1 dense (intermediate 10944)", "experts: 128 × 45 layers", "fits: 16 GB"):
        assert line in out, line
    assert main(["plan", "--model", "Qwen/Qwen1.5-MoE-A2.7B", "--method", "qlora", "--json"]) == 0
    assert '"shared_gate": true' in capsys.readouterr().out


def test_fsdp_gathers_the_largest_layer_and_shards_the_rest():
    """FSDP over an MoE with a dense layer and shared experts: its unit is a decoder layer, the largest (an MoE
    layer's experts, router, shared MLP) gathered twice, its trainable tensors' gradients in fp32; a rank
    keeps ceil(dim 0 / N) rows of every parameter, the buffers (rope, DoRA norms, the routers' score-correction
    biases) whole. As tests/test_plan_moe.py checks it for an MoE whose every layer is routed."""
    from test_plan_moe import FSDP_UNITS

    from qdora.train.fsdp import prepare_for_fsdp  # torch.distributed's FSDP: only this test needs it
    model, shape, cfg = _adapted("tiny-glm4-moe", "qdora", "q_proj,k_proj,v_proj,experts,up_proj,down_proj", "", 0.05,
                                 r=4)
    model = prepare_for_fsdp(model, None)
    two = plan(shape, cfg.replace(gpus=2))
    layers = model.model.layers
    assert two.details[FSDP_UNITS[0]] == 2 * max(sum(p.nbytes for p in layer.parameters()) for layer in layers)
    assert two.details[FSDP_UNITS[2]] == max(sum(p.nbytes for p in layer.parameters() if p.requires_grad)
                                             for layer in layers)
    padded = sum(-(-p.shape[0] // 2) * p[0].nbytes for p in model.parameters())
    buffers = sum(b.nbytes for b in model.buffers())
    assert two.terms["nf4_weights"] + two.terms["base_weights"] + two.terms["adapters"] - buffers == padded
    assert two.terms["quant_state"] == plan(shape, cfg).terms["quant_state"] and two.start_bytes > 0
