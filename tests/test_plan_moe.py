"""The memory planner on mixtures of experts: the presets' shapes against transformers' own models, the
resident terms byte for byte against real adapted MoE models (experts in NF4, per-expert adapters,
the router), the peak against measured CPU training steps of scaled-down Qwen3-MoE, OLMoE and
Mixtral (within 15%, as the dense planner), what the targets mean on an MoE, FSDP over an MoE (its
sharding against a real adapted model's parameters, its start measured on 2 processes), and the command."""

import json

import bitsandbytes as bnb
import pytest
import torch
import transformers

import qdora
from qdora.cli import main
from qdora.core.layer import QDoRALinear
from qdora.eval.plan.validate import MOE, MOE_SHAPES, build_model, error, measure
from qdora.plan.memory import GIB, PRESETS, PlanConfig, plan, resolve_model, shape_from_config
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
    sparse = shape_from_config({**_config("qwen3-30b-a3b").to_dict(), "mlp_only_layers": [0, 1]}, name="q")
    assert sparse.dense_layers == (0, 1) and sparse.moe_layers == 46   # planned (tests/test_plan_moe_shared.py)
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


FSDP_UNITS = ("fsdp: 2 decoder layers unsharded (computing + prefetched)",
              "fsdp: root unsharded (embeddings, final norm, lm_head)",
              "fsdp: one layer's gradients before reduce-scatter (fp32)")
ATTENTION_EXPERTS = "q_proj,k_proj,v_proj,o_proj,experts"


def _fsdp_model(method, targets):
    """A tiny Qwen3-MoE adapted as `qdora train` adapts it, its NF4 layers made shardable as
    `qdora.train.fsdp.build_sharded` makes them (the parameters `fully_shard` then shards), and its plan."""
    from qdora.train.fsdp import prepare_for_fsdp  # torch.distributed's FSDP: only these tests need it
    model, config = _tiny("tiny-qwen3-moe")
    cfg = PlanConfig(method=method, r=4, target_modules=targets, device="cpu")
    qdora.add_adapters(model, qdora.AdapterConfig(method=method, r=4, target_modules=cfg.target_modules,
                                                  adapter_dtype="float32"), verbose=False)
    return prepare_for_fsdp(model, None), shape_from_config(config, name="tiny-qwen3-moe"), cfg


@pytest.mark.parametrize("method,targets", [("qdora", ATTENTION_EXPERTS), ("qlora", "q_proj,k_proj,v_proj"),
                                            ("qdora", "q_proj,v_proj,gate,experts.down_proj")])
def test_fsdp_over_an_moe_holds_what_fully_shard_makes_of_the_model(method, targets):
    """FSDP's unit is the whole MoE decoder layer (every expert's packed NF4 data, the router, every
    expert's adapters): its unsharded copy and its gradients are one real layer's parameters; a rank keeps
    ceil(dim 0 / N) rows of each parameter (FSDP2 pads dim 0), which for N=2 and these even sizes is the
    planner's ceil(sharded bytes / N); quantization states and DoRA's norm buffers stay whole."""
    model, shape, cfg = _fsdp_model(method, targets)
    layer = model.model.layers[1]
    one, two = plan(shape, cfg), plan(shape, cfg.replace(gpus=2))
    layer_bytes = sum(p.nbytes for p in layer.parameters())                     # fp32 on CPU: gathered as held
    assert two.details[FSDP_UNITS[0]] == 2 * layer_bytes
    assert two.details[FSDP_UNITS[2]] == sum(p.nbytes for p in layer.parameters() if p.requires_grad)
    root = [p for n, p in model.named_parameters() if not n.startswith("model.layers.")]
    assert two.details[FSDP_UNITS[1]] == sum(p.nbytes for p in root)
    buffers = sum(b.nbytes for b in model.buffers())                             # rope, DoRA norms: not sharded
    padded = sum(-(-p.shape[0] // 2) * p[0].nbytes for p in model.parameters())  # a rank's shards, as FSDP2 pads
    assert two.terms["nf4_weights"] + two.terms["base_weights"] + two.terms["adapters"] - buffers == padded
    assert sum(one.terms[k] for k in ("nf4_weights", "base_weights", "adapters")) - buffers == \
        sum(p.nbytes for p in model.parameters())
    assert two.terms["quant_state"] == one.terms["quant_state"]
    trainable = sum(p.nbytes for p in model.parameters() if p.requires_grad)
    assert two.terms["optimizer_states"] == -(-2 * trainable // 2)
    assert two.terms["activations"] == one.terms["activations"]                # each rank runs its own batch
    assert two.terms["fsdp_buffers"] == sum(two.details[k] for k in FSDP_UNITS)  # not the experts' lines


def test_fsdp_over_an_moe_divides_the_sharded_terms_by_n():
    """The presets under FSDP as the dense planner: sharded terms ceil(/N), whole ones unchanged, the
    experts' report lines per rank (in CPU memory with offload), the step's figures as docs/planner.md shows."""
    for name in ("Qwen3-30B-A3B", "OLMoE-1B-7B", "Mixtral-8x7B"):
        base = PlanConfig(method="qdora", target_modules=ATTENTION_EXPERTS)
        one = plan(name, base)
        for n in (2, 3, 8):
            p = plan(name, base.replace(gpus=n))
            for term in ("nf4_weights", "optimizer_states"):
                assert p.terms[term] == -(-one.terms[term] // n), (name, n, term)
            assert p.terms["quant_state"] == one.terms["quant_state"]
            assert p.start_bytes > 0 and set(FSDP_UNITS) <= set(p.details)
            for k, v in one.details.items():
                if "adapters" in k:  # at N=1 the line holds the DoRA norm buffers too: at N, a line of their own
                    where = k.replace(", adapters (+ DoRA norm buffers)", "")
                    buffers = p.details[f"{where}, DoRA norm buffers"]
                    assert p.details[f"{where}, adapters, 1/{n} per rank"] == -(-(v - buffers) // n)
                elif "quantization state" in k:
                    assert p.details[k] == v
                else:
                    assert p.details[f"{k}, 1/{n} per rank"] == -(-v // n), (name, k)
        offload = plan(name, base.replace(gpus=2, cpu_offload=True))
        assert offload.terms["nf4_weights"] == 0 and offload.terms["quant_state"] == one.terms["quant_state"]
        assert any(k.endswith("NF4 weights (packed), 1/2 in CPU memory") for k in offload.details)
    qwen = plan("Qwen3-30B-A3B", PlanConfig(method="qdora", target_modules=ATTENTION_EXPERTS, gpus=2))
    mixtral = plan("Mixtral-8x7B", PlanConfig(method="qdora", target_modules=ATTENTION_EXPERTS, gpus=2))
    assert [round(p.total_bytes / GIB, 2) for p in (qwen, mixtral)] == [19.77, 18.55]


def test_the_fsdp_start_reads_each_expert_alone():
    """The start quantizes each expert's projection alone (Mixtral's largest weight is an expert's gate_up,
    117M elements, 7 times q_proj): on CUDA copied to the GPU in bf16; on a CPU device the gate_up is joined
    from copied gate and up halves (twice its size), and, before anything is read, each fused expert
    parameter is made whole for a moment while the model is built on the meta device."""
    from qdora.plan import moe
    from qdora.plan.memory import dims  # the planner's sizes, to call its MoE terms alone
    shape = PRESETS["mixtral-8x7b"]
    gate_up, down = 2 * shape.moe_intermediate * shape.hidden, shape.hidden * shape.moe_intermediate
    cuda = dims(shape, PlanConfig(gpus=2, target_modules=ATTENTION_EXPERTS))
    assert moe.start_reads(cuda, PlanConfig(gpus=2))[-2:] == [(gate_up, 2 * gate_up), (down, 2 * down)]
    cpu = dims(shape, PlanConfig(gpus=2, device="cpu", target_modules=ATTENTION_EXPERTS))
    assert moe.start_reads(cpu, PlanConfig(gpus=2, device="cpu"))[-2:] == [(gate_up, 8 * gate_up), (down, 0)]
    assert moe.built_on_meta(cpu, PlanConfig(gpus=2, device="cpu")) == 8 * 4 * gate_up
    assert moe.built_on_meta(cuda, PlanConfig(gpus=2)) == 0                     # host memory, not the GPU's


def test_cli_plan_fsdp_over_an_moe(capsys):
    assert main(["plan", "--model", "Qwen3-30B-A3B", "--method", "qdora", "--gpus", "2", "--target-modules",
                 ATTENTION_EXPERTS]) == 0
    out = capsys.readouterr().out
    for line in ("2 GPUs (FSDP)", "experts: 128 × 48 layers, NF4 weights (packed), 1/2 per rank: 6.75 GiB",
                 "experts: 128 × 48 layers, quantization state: 0.44 GiB", "fsdp: 2 decoder layers unsharded",
                 "| **total** | **19.77** |", "start, per GPU", "fits: 16 GB no  24 GB tight"):
        assert line in out, line
    assert main(["plan", "--model", "Qwen3-30B-A3B", "--method", "qdora", "--gpus", "2", "--cpu-offload",
                 "--target-modules", ATTENTION_EXPERTS]) == 0
    out = capsys.readouterr().out
    assert "1/2 in CPU memory" in out and "cpu offload: sharded parameters" in out


@pytest.mark.slow
def test_plan_predicts_the_measured_fsdp_start_of_an_moe(tmp_path):
    """`qdora plan`'s FSDP start against the start measured on each of 2 CPU processes (the profiler's peak
    of live tensor bytes over `build_sharded`, the mapped checkpoint left out; tests/fsdp_worker.py), for
    tiny Qwen3-MoE checkpoints stored one tensor per expert: 8 experts (`tests/test_moe.py`'s; it peaks
    while its root is sharded, measured 700,060 bytes, predicted 698,752) and 4 wider ones (intermediate
    512; it peaks while an expert's gate_up, joined from its halves, is quantized: measured 1,567,896,
    predicted 1,580,864). Within 5% (as measured: -0.2% and +0.8%)."""
    from test_fsdp import _ok, config, torchrun
    from test_moe import ARCHITECTURES, COMMON, make_checkpoint

    from qdora.data.examples import DEMO_DATA
    from qdora.train.loop import TrainConfig
    (tmp_path / "data.json").write_text(json.dumps(json.loads((DEMO_DATA / "arc_easy_train.json").read_text())[:4]))
    make_checkpoint("qwen3_moe", tmp_path / "model")
    arch, extra = ARCHITECTURES["qwen3_moe"]
    wide = getattr(transformers, arch)(**{**COMMON, **extra, "moe_intermediate_size": 512, "num_experts": 4})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(wide).save_pretrained(tmp_path / "wide")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "wide" / name).write_bytes((tmp_path / "model" / name).read_bytes())
    settings = dict(method="qdora", fsdp=True, max_steps=1, batch_size=2, target_modules=ATTENTION_EXPERTS.split(","))
    runs = {name: config(tmp_path, tmp_path / f"out-{name}", model=str(tmp_path / name), **settings)
            for name in ("model", "wide")}
    _ok(torchrun({"runs": [{"config": c, "measure_start": True} for c in runs.values()]}, tmp_path))
    for name, c in runs.items():
        cfg = TrainConfig(**c)
        predicted = plan(str(tmp_path / name), PlanConfig(
            method=cfg.method, r=cfg.r, dropout=cfg.dropout, target_modules=tuple(cfg.target_modules), device="cpu",
            gpus=2, adapter_dtype=cfg.adapter_dtype)).start_bytes
        for r in (0, 1):
            measured = json.loads((tmp_path / f"out-{name}" / f"facts-rank{r}.json").read_text())["start_peak_bytes"]
            assert abs(predicted / measured - 1) <= 0.05, (name, r, predicted, measured)
