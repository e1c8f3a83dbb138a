"""Mixture-of-experts models: experts held apart, in NF4 expert by expert, with DoRA (or LoRA) per expert.

The layer against an fp64 oracle built from the dequantized weights; tiny random Qwen3-MoE, OLMoE and
Mixtral checkpoints made here from transformers configs (saved per expert, as transformers 5 writes
them, and fused) loaded, adapted, trained, merged, saved both ways and sharded on 2 processes."""

import json
import os
import shutil
import signal

import pytest
import torch
from conftest import assert_close
from models import perturb, save_bpe_tokenizer
from safetensors.torch import load_file, save_file
from torch import nn

from qdora import AdapterConfig, QDoRALinear, add_adapters, load_adapter, load_model, merge_and_save, save_adapter
from qdora.core.experts import AdaptedRouter, QDoRAExperts
from qdora.core.nf4 import RowBlocks, linear4bit_from_weight
from qdora.data.examples import DEMO_DATA

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256)
ARCHITECTURES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, intermediate_size=128, moe_intermediate_size=64,
                                         num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=64, num_experts=8, num_experts_per_tok=2)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
}
TARGETS = ("q_proj", "v_proj", "experts", "gate")  # "gate": the router (mlp.gate), not an nn.Linear
IDS = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(9))


def make_checkpoint(name, path):
    config_class, extra = ARCHITECTURES[name]
    config = getattr(transformers, config_class)(**COMMON, **extra)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)  # one tensor per expert
    records = json.loads((DEMO_DATA / "arc_easy_train.json").read_text())[:8]
    save_bpe_tokenizer(path, [r["instruction"] + " " + r["output"] for r in records])
    return path


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def checkpoint(request, tmp_path_factory):
    return request.param, make_checkpoint(request.param, tmp_path_factory.mktemp(request.param) / "ckpt")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe") / "ckpt")


def adapted(path, method="qdora", targets=TARGETS, seed=1):
    cfg = AdapterConfig(method=method, r=4, alpha=8, dropout=0.0, target_modules=targets)
    torch.manual_seed(seed)
    model, tok = load_model(path, method=method, cfg=cfg, progress=False)
    return perturb(model).eval(), tok


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


# ---- the layer against an fp64 oracle ------------------------------------------------------------------------

def nf4_experts(E=6, H=64, inter=64, method="qdora", norm="detached", seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate_up, down = [], []
    for _ in range(E):
        for out, inp, where in ((2 * inter, H, gate_up), (H, inter, down)):
            base = linear4bit_from_weight(torch.randn(out, inp, generator=gen) / inp ** 0.5, None, 64, True)
            where.append(QDoRALinear(base, r=4, alpha=8, use_dora=method == "qdora", norm=norm)
                         if method else base)
    return QDoRAExperts(gate_up, down, nn.SiLU(), "test")


def experts_reference(x, index, weights, layers, values):
    """fp64: y_t = Σ_j w_tj · W'_down,e (silu(W'_gate,e x_t) ⊙ W'_up,e x_t), e = index[t, j], with every
    W' = (m / ||W0 + s·B·A||) ⊙ (W0 + s·B·A) built whole from the dequantized NF4 W0 (norm detached);
    `values`: the adapter tensors by parameter name (fp64 leaves)."""
    def effective(name, layer):
        W0 = RowBlocks(layer.base_layer, 1024).dequantize(torch.float32).double()
        V = W0 + layer.scaling * values[f"{name}.lora_B"] @ values[f"{name}.lora_A"]
        if not layer.use_dora:
            return V
        m = layer.base_norm.double() + values[f"{name}.magnitude_delta"]
        return V * (m / V.norm(dim=1).detach())[:, None]

    gate_up, down = [[effective(f"{p}.{e}", m) for e, m in enumerate(getattr(layers, p))]
                     for p in ("gate_up_proj", "down_proj")]
    out = []
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(index.shape[1]):
            e = int(index[t, j])
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            y = y + weights[t, j] * (down[e] @ (torch.nn.functional.silu(gate) * up))
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("method", ["qdora", "qlora"])
def test_experts_forward_and_gradients_match_the_fp64_oracle(method):
    layers = perturb(nf4_experts(method=method)).train()
    T, k = 10, 2
    x = torch.randn(T, 64, requires_grad=True)
    index = torch.tensor([[0, 3], [3, 1], [0, 1], [5, 0], [3, 5], [1, 0], [0, 3], [5, 1], [1, 3], [0, 5]])
    weights = torch.softmax(torch.randn(T, k), -1)
    y = layers(x, index, weights)
    named = {n: p for n, p in layers.named_parameters() if p.requires_grad}
    dy = torch.randn_like(y)
    grads = dict(zip(["x", *named], torch.autograd.grad(y, [x, *named.values()], dy)))

    values = {n: p.detach().double().requires_grad_(True) for n, p in named.items()}
    x64 = x.detach().double().requires_grad_(True)
    ref = experts_reference(x64, index, weights.double(), layers, values)
    ref_grads = dict(zip(["x", *values], torch.autograd.grad(ref, [x64, *values.values()], dy.double(),
                                                              allow_unused=True)))
    assert_close(y, ref, 1e-5, "experts output")
    unrouted = 0
    for name, g in grads.items():
        if ref_grads[name] is None:  # an expert no token chose (2 and 4): its adapter's gradient is zero
            assert name.split(".")[1] in ("2", "4") and torch.count_nonzero(g) == 0, name
            unrouted += 1
        else:
            assert_close(g, ref_grads[name], 1e-4, name)
    assert unrouted == 2 * 2 * (3 if method == "qdora" else 2)


def test_only_routed_experts_are_dequantized(monkeypatch):
    layers = nf4_experts(E=8).eval()
    seen = []
    original = RowBlocks.blocks

    def spy(self, *args, **kw):
        seen.append(id(self))
        return original(self, *args, **kw)
    monkeypatch.setattr(RowBlocks, "blocks", spy)
    index = torch.tensor([[2, 6], [6, 2], [2, 6]])
    with torch.no_grad():
        layers(torch.randn(3, 64), index, torch.full((3, 2), 0.5))
    wanted = {id(getattr(layers, p)[e]._blocks) for e in (2, 6) for p in ("gate_up_proj", "down_proj")}
    assert set(seen) == wanted


# ---- tiny real architectures -----------------------------------------------------------------------------------

def router_choices(model):
    """The experts every MoE layer's router picks for IDS (top-k indices, per layer)."""
    picked = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: picked.append(out[2].clone()))
             for n, m in model.named_modules() if n.endswith("mlp.gate")]
    logits(model)
    for h in hooks:
        h.remove()
    return picked


def test_step0_is_the_unadapted_nf4_model_and_routes_the_same(checkpoint):
    name, path = checkpoint
    nf4, _ = load_model(path, method="qdora", add=False, progress=False)
    torch.manual_seed(1)
    model, _ = load_model(path, cfg=AdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=TARGETS), progress=False)
    experts = [m for m in model.modules() if isinstance(m, QDoRAExperts)]
    assert len(experts) == 2 and all(isinstance(m.gate_up_proj[0], QDoRALinear) for m in experts)
    assert all(isinstance(m.adapter, QDoRALinear) for m in model.modules() if isinstance(m, AdaptedRouter))
    assert sum(isinstance(m, AdaptedRouter) for m in model.modules()) == 2
    assert all(isinstance(m, QDoRAExperts) and not isinstance(m.down_proj[0], QDoRALinear)
               for n, m in nf4.named_modules() if n.endswith("mlp.experts"))
    assert torch.equal(logits(model.eval()), logits(nf4.eval())), f"{name} step 0"  # m / n is exactly 1
    for a, b in zip(router_choices(model), router_choices(nf4)):
        assert torch.equal(a, b)


def test_the_loader_reads_fused_and_per_expert_checkpoints_alike(qwen, tmp_path):
    fused = tmp_path / "fused"
    shutil.copytree(qwen, fused)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(qwen, dtype=torch.float32).eval()
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, fused / "model.safetensors",
              metadata={"format": "pt"})
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(fused / "model.safetensors")
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in load_file(qwen / "model.safetensors")
    cfg = AdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    states = []
    for path in (qwen, fused):
        torch.manual_seed(1)
        states.append(load_model(path, cfg=cfg, progress=False)[0].state_dict())
    torch.manual_seed(1)
    states.append(add_adapters(transformers.AutoModelForCausalLM.from_pretrained(qwen, dtype=torch.float32), cfg,
                               verbose=False).state_dict())  # the one-line path for a transformers model
    for other in states[1:]:
        assert sorted(other) == sorted(states[0])
        assert all(torch.equal(other[k], states[0][k]) for k in other)
    for path in (qwen, fused):  # method full keeps transformers' fused experts, filled expert by expert
        full, _ = load_model(path, method="full", progress=False)
        assert torch.equal(logits(full.eval()), logits(theirs))


def test_merge_reloads_in_plain_transformers(checkpoint, tmp_path):
    name, path = checkpoint
    model, tok = adapted(path)
    merge_and_save(model, tmp_path / "merged", tokenizer=tok, dtype=torch.float32)
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    assert weights["model.layers.0.mlp.experts.gate_up_proj"].dim() == 3
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert_close(logits(plain), logits(model), 1e-4, f"{name} merged logits")


def test_adapter_files_ours_and_peft(checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    name, path = checkpoint
    model, _ = adapted(path)
    save_adapter(model, tmp_path / "dora")
    fresh, _ = load_model(path, add=False, progress=False)
    load_adapter(fresh, tmp_path / "dora", verbose=False)
    assert_close(logits(fresh.eval()), logits(model), 1e-6, f"{name} qdora file")
    with pytest.raises(ValueError, match="PEFT cannot express DoRA on an MoE's experts"):
        save_adapter(adapted(path, targets=TARGETS[:-1])[0], tmp_path / "peft-dora", format="peft")
    model.save_pretrained(tmp_path / "auto")  # falls back to ours for DoRA on experts
    assert (tmp_path / "auto" / "qdora_adapter.json").is_file()

    lora, _ = adapted(path, method="lora")
    with pytest.raises(ValueError, match=r"PEFT cannot express an adapter on an MoE router \(model.layers.0.mlp.gate"):
        save_adapter(lora, tmp_path / "peft", format="peft")
    lora, _ = adapted(path, method="lora", targets=TARGETS[:-1])
    save_adapter(lora, tmp_path / "peft", format="peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert_close(logits(theirs), logits(lora), 1e-5, f"{name} PEFT reads our expert LoRA")
    ours, _ = load_model(path, method="lora", add=False, progress=False)
    load_adapter(ours, tmp_path / "peft", verbose=False)
    assert_close(logits(ours.eval()), logits(lora), 1e-6, f"{name} qdora reads PEFT's expert LoRA")


def test_the_streamed_start_builds_the_same_model(checkpoint):
    from qdora.models.loading import stream_model
    name, path = checkpoint
    cfg = AdapterConfig(r=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    torch.manual_seed(3)
    whole, _ = load_model(path, cfg=cfg, progress=False)
    torch.manual_seed(3)
    streamed, _ = stream_model(path, cfg, progress=False)
    a, b = whole.state_dict(), streamed.state_dict()
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_lowers_the_loss_and_resumes(checkpoint, tmp_path):
    from qdora.train.loop import TrainConfig, read_metrics, train
    name, path = checkpoint
    records = json.loads((DEMO_DATA / "arc_easy_train.json").read_text())[:8]
    (tmp_path / "data.json").write_text(json.dumps(records))
    settings = dict(model=str(path), data=str(tmp_path / "data.json"), r=4, alpha=8, lr=2e-2, batch_size=4,
                    cutoff_len=512, dropout=0.0, target_modules=TARGETS, progress=False, save_every=3, max_steps=6)
    summary = train(TrainConfig(out=str(tmp_path / "run"), **settings))
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert len(losses) == 6 and all(map(torch.isfinite, map(torch.tensor, losses)))
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    experts = [n for n in summary["model"].state_dict() if ".experts.gate_up_proj." in n and "lora_A" in n]
    assert experts
    # stopped after step 3, resumed: the same losses and adapter as the run that went straight through
    stop_at_3 = lambda step, _: step == 3 and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731  (as a stop does)
    train(TrainConfig(out=str(tmp_path / "half"), **settings), on_step=stop_at_3)
    assert len(read_metrics(tmp_path / "half")) == 3
    train(TrainConfig(out=str(tmp_path / "half"), resume=True, **settings))
    assert [m["loss"] for m in read_metrics(tmp_path / "half")] == losses
    a = load_file(tmp_path / "half" / "adapter" / "adapter.safetensors")
    b = load_file(tmp_path / "run" / "adapter" / "adapter.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---- bad input ----------------------------------------------------------------------------------------------

def test_an_experts_layout_not_understood_is_named_in_one_line(qwen):
    model = transformers.AutoModelForCausalLM.from_pretrained(qwen, dtype=torch.float32)
    experts = model.model.layers[0].mlp.experts
    experts.is_transposed = True
    with pytest.raises(ValueError) as err:
        add_adapters(model, AdapterConfig(r=4, target_modules=TARGETS), verbose=False)
    assert "Qwen3MoeExperts" in str(err.value) and "is_transposed=True" in str(err.value)
    assert "\n" not in str(err.value) and "keep_full_precision" in str(err.value)
    assert isinstance(model.model.layers[1].mlp.experts, type(experts))  # nothing was changed
    add_adapters(model, AdapterConfig(r=4, target_modules=("q_proj",), keep_full_precision=("lm_head", "experts")),
                 verbose=False)  # the way out the message names
    assert model.model.layers[0].mlp.experts is experts


def test_an_expert_target_that_matches_nothing_lists_experts_and_linears(qwen):
    model = transformers.AutoModelForCausalLM.from_pretrained(qwen, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"(?s)'experts.up_proj' matches no linear module.*linear modules: leaf "
                                         r"names: k_proj, lm_head, o_proj, q_proj, v_proj.*experts: 2 modules like "
                                         r"model.layers.0.mlp.experts \(8 experts each"):
        add_adapters(model, AdapterConfig(method="dora", r=4, target_modules=("q_proj", "experts.up_proj")),
                     verbose=False)
    # A bare projection name targets linear layers only: not every expert of an MoE.
    with pytest.raises(ValueError, match=r"'down_proj' matches no linear module \(Qwen3MoeForCausalLM's MLPs are "
                                         r"experts: target them as 'experts', 'experts.gate_up_proj' or "):
        add_adapters(model, AdapterConfig(method="dora", r=4, target_modules=("down_proj",)), verbose=False)


def test_an_moe_adapter_on_a_dense_model_or_other_experts_is_refused_by_name(qwen, tmp_path):
    model, _ = adapted(qwen)
    save_adapter(model, tmp_path / "moe")
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, intermediate_size=64))
    with pytest.raises(ValueError, match=r"adapts the experts of an MoE with 8 experts per layer; this model "
                                         r"\(LlamaForCausalLM\) has no experts \(a dense model\)"):
        load_adapter(dense, tmp_path / "moe")
    config_class, extra = ARCHITECTURES["qwen3_moe"]
    fewer = transformers.Qwen3MoeForCausalLM(getattr(transformers, config_class)(**COMMON, **{**extra,
                                                                                            "num_experts": 4}))
    with pytest.raises(ValueError, match="MoE with 8 experts per layer; this model .* has 4 experts per MoE layer"):
        load_adapter(fewer, tmp_path / "moe")


@pytest.mark.slow
def test_fsdp_on_two_processes_trains_what_one_process_trains(qwen, tmp_path):
    from test_fsdp import LR, STEPS, _assert_same_adapter, _assert_same_losses, _ok, torchrun

    from qdora.train.loop import TrainConfig, read_metrics, train
    records = json.loads((DEMO_DATA / "arc_easy_train.json").read_text())[:11]
    (tmp_path / "data.json").write_text(json.dumps(records))
    settings = dict(model=str(qwen), data=str(tmp_path / "data.json"), method="qdora", r=4, alpha=8, dropout=0.0,
                    lr=LR, max_steps=STEPS, batch_size=5, cutoff_len=320, save_every=2, warmup_steps=1,
                    progress=False, target_modules=list(TARGETS))
    train(TrainConfig(out=str(tmp_path / "single"), **settings))
    _ok(torchrun({"runs": [{"config": {**settings, "out": str(tmp_path / "fsdp"), "fsdp": True}}]}, tmp_path))
    _assert_same_losses(read_metrics(tmp_path / "fsdp"), read_metrics(tmp_path / "single"))
    _assert_same_adapter(tmp_path / "fsdp" / "adapter", tmp_path / "single" / "adapter")
    saved = load_file(tmp_path / "fsdp" / "adapter" / "adapter.safetensors")
    moved = [k for k, v in saved.items() if ".experts." in k and k.endswith("lora_B") and v.abs().max() > 1e-4]
    assert len(moved) > 8  # the experts' adapters trained (B starts at 0), on both projections



def test_gpt_oss_and_a_custom_forward_are_refused_by_class_name(qwen):
    config = transformers.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                       num_experts_per_tok=2, layer_types=["full_attention"])
    with pytest.raises(ValueError, match=r"^experts layout not handled: model.layers.0.mlp.experts \(GptOssExperts: "
                                         r"is_transposed=True\)") as err:
        add_adapters(transformers.GptOssForCausalLM(config), AdapterConfig(r=4, target_modules=("q_proj",)),
                     verbose=False)
    # the way out, as the library and the command line spell it (`qdora train` has the flag)
    assert "keep_full_precision=('lm_head', 'experts')" in str(err.value)
    assert "--keep-full-precision lm_head,experts" in str(err.value)
    model = transformers.AutoModelForCausalLM.from_pretrained(qwen, dtype=torch.float32)
    experts = model.model.layers[0].mlp.experts

    class ScaledExperts(type(experts)):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return 2 * super().forward(hidden_states, top_k_index, top_k_weights)
    experts.__class__ = ScaledExperts
    with pytest.raises(ValueError, match=r"ScaledExperts: its own forward, not transformers' experts loop"):
        add_adapters(model, AdapterConfig(r=4, target_modules=TARGETS), verbose=False)


def test_merge_through_the_command_line_and_what_it_refuses_for_experts(qwen, tmp_path, capsys):
    from qdora.cli import main
    model, _ = adapted(qwen)
    save_adapter(model, tmp_path / "adapter")
    argv = ["merge", "--model", str(qwen), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"),
            "--dtype", "float32"]
    assert main(argv) == 0
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert_close(logits(plain), logits(model), 1e-4, "qdora merge of an MoE adapter")
    capsys.readouterr()
    for extra, message in ((["--format", "lora", "--rank", "4"], "this adapter adapts an MoE's experts"),
                           (["--original"], "--original is not supported for an adapter on an MoE's experts")):
        assert main(argv[:5] + ["--out", str(tmp_path / "x")] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x").exists()


def test_all_linear_with_experts_and_keep_full_precision(qwen):
    model = transformers.AutoModelForCausalLM.from_pretrained(qwen, dtype=torch.float32)
    add_adapters(model, AdapterConfig(r=4, target_modules=("all-linear", "experts.down_proj")), verbose=False)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.o_proj, QDoRALinear) and not isinstance(model.lm_head, QDoRALinear)
    assert isinstance(layer.mlp.experts.down_proj[7], QDoRALinear)
    assert type(layer.mlp.experts.gate_up_proj[7]).__name__ == "Linear4bit"  # frozen, NF4
    kept = transformers.AutoModelForCausalLM.from_pretrained(qwen, dtype=torch.float32)
    add_adapters(kept, AdapterConfig(r=4, target_modules=("experts.down_proj",),
                                     keep_full_precision=("lm_head", "experts.gate_up_proj")), verbose=False)
    assert type(kept.model.layers[0].mlp.experts.gate_up_proj[7]) is nn.Linear


def _tiny(config_class, extra):
    config = getattr(transformers, config_class)(**COMMON, **extra)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def _routers(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, AdaptedRouter))


@pytest.mark.parametrize("targets", [("all-linear", "experts", "gate"), ("all", "gate"), ("gate", "all-linear")])
def test_all_linear_keeps_the_routers_named_beside_it(targets):
    """`gate` names the routers (not linears): a wildcard beside it must not drop them."""
    explicit = add_adapters(_tiny(*ARCHITECTURES["qwen3_moe"]), AdapterConfig(
        r=4, target_modules=("q_proj", "experts", "gate")), verbose=False)
    model = add_adapters(_tiny(*ARCHITECTURES["qwen3_moe"]), AdapterConfig(r=4, target_modules=targets),
                         verbose=False)
    assert _routers(model) == _routers(explicit) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert isinstance(model.model.layers[1].self_attn.o_proj, QDoRALinear)


def test_all_linear_with_gate_checks_the_rank_against_the_experts():
    with pytest.raises(ValueError, match=r"r=16 exceeds model.layers.0.mlp.gate \(8x64\)"):
        add_adapters(_tiny(*ARCHITECTURES["qwen3_moe"]), AdapterConfig(r=16, target_modules=("all-linear", "gate")),
                     verbose=False)


QWEN2_MOE = ("Qwen2MoeConfig", dict(intermediate_size=128, moe_intermediate_size=64,
                                    shared_expert_intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                                    decoder_sparse_step=1))


def test_all_linear_leaves_out_what_cannot_take_the_rank_and_says_so():
    """Qwen2-MoE's `shared_expert_gate` is Linear(H, 1): all-linear at r=16 adapts the rest (as PEFT
    accepts the config) and names it; named explicitly, it stays an error."""
    model = _tiny(*QWEN2_MOE)
    said = (r"all-linear left 2 linear module\(s\) frozen that cannot take r=16 .*"
            r"model.layers.0.mlp.shared_expert_gate, model.layers.1.mlp.shared_expert_gate")
    with pytest.warns(UserWarning, match=said):
        add_adapters(model, AdapterConfig(r=16, target_modules=("all-linear",)), verbose=False)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.shared_expert.down_proj, QDoRALinear)
    assert type(mlp.shared_expert_gate).__name__ == "Linear4bit"  # frozen, NF4
    assert not any(p.requires_grad for p in mlp.shared_expert_gate.parameters())
    with pytest.raises(ValueError, match=r"r=16 exceeds model.layers.0.mlp.shared_expert_gate \(1x64\)"):
        add_adapters(_tiny(*QWEN2_MOE), AdapterConfig(r=16, target_modules=("all-linear", "shared_expert_gate")),
                     verbose=False)


def test_adapters_off_is_the_base_moe_bit_for_bit(qwen):
    """Experts, router and attention adapters switched off together: the unadapted NF4 model."""
    model, _ = adapted(qwen)
    base, _ = load_model(qwen, method="qdora", add=False, progress=False)
    with model.disable_adapter():
        assert torch.equal(logits(model), logits(base.eval()))
    assert not torch.equal(logits(model), logits(base))
