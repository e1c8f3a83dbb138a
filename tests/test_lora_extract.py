"""`qdora merge --format lora` / `qdora.extract_lora`: each layer's exact change `ΔW = W' − W0` as a
truncated SVD, written as a PEFT LoRA adapter. Oracles: `ΔW` built in fp64 from the layer's own
tensors and its fp64 SVD; PEFT serving the written adapter."""

import json

import pytest
import torch
from conftest import FP32_TOL, assert_close
from models import llama3_config
from test_merge import U32, adapted_model, logits, merged_weight_bound

from qdora import QDoRALinear, load_model
from qdora.export.lora import extract_lora, layer_delta, save_lora, truncated_svd

# Every row a whole number of NF4 blocks (64): bitsandbytes 0.50's CPU dequantize_4bit, which PEFT serves
# through, is wrong for rows that are not (64 x 96: off by 0.039; qdora's own path matches the reference).
CONFIG = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def delta_fp64(layer: QDoRALinear) -> torch.Tensor:
    """`W' − W0` in fp64 from the layer's own tensors: the DoRA formula, written out."""
    W0 = layer.dequantized_base(torch.float32).double()
    A, B = layer.direction_factors()
    V = W0 if A is None else W0 + layer.scaling * B.detach().double() @ A.detach().double()
    W = (layer.magnitude.double() / V.norm(dim=1))[:, None] * V if layer.use_dora else V
    return W - W0


def best_rank_k(delta: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def svd_eps(shape) -> float:
    """Relative backward error of LAPACK's fp32 SVD: the computed triplets are those of `ΔW + E`,
    `‖E‖_F ≤ p(m, n)·u·‖ΔW‖_F`. LAPACK states p only as "a modestly growing function of m and n"
    (Users' Guide §4.9); Householder reduction's error grows with the reflectors' length (Higham,
    Accuracy and Stability, Thm 19.4): p = max(m, n)."""
    return max(shape) * U32


def delta_bound(layer: QDoRALinear, delta: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on `|layer_delta(layer) − ΔW|` (the extraction's fp32 input): the merged
    weight's (tests/test_merge.py, `merged_weight_bound`) plus the rounding of subtracting W0."""
    W0 = layer.dequantized_base(torch.float32).double()
    A, B = (t.detach().double() for t in layer.direction_factors())
    bound = merged_weight_bound(W0, A, B, layer.scaling, layer.magnitude.double() if layer.use_dora else None)
    return bound + U32 * (delta.abs() + bound)


@pytest.mark.parametrize("method", ["qdora", "qlora", "dora", "lora"])
def test_the_extraction_is_the_truncated_svd_of_the_exact_change(tmp_path, method):
    """Against the fp64 truncation with the roundoff accounted for. The extraction's input `Δ̃`
    (layer_delta, fp32) is within `δ` (delta_bound, Frobenius) of ΔW, and the SVD is exact for
    `Δ̃ + E`, `‖E‖ ≤ ε‖Δ̃‖` (svd_eps): so `‖Δ̃ + E − ΔW‖ ≤ e := δ + ε(‖ΔW‖ + δ)`; the factors
    `U·√S`, `√S·Vᵀ` round to fp32 (2u each: `ρ = 4u·‖|B|·|A|‖`). Then:
    - optimality, gap-free: `tail_k = √(Σ_(i>k) σᵢ²)` is 1-Lipschitz in the Frobenius norm
      (Mirsky), so `‖ΔW − ours‖ ≤ tail_k(ΔW) + 2e + ρ`: a wrong component kept is 10–10⁴x over;
    - nearness to the fp64 truncation, where the gap allows: `ours − ΔW_k` is the input error plus
      the rotation of the top-k subspaces, `‖sin Θ‖ ≤ √2·e/(σ_k − σ_(k+1) − e)` (Wedin), acting
      on σ₁ and σ_(k+1): `≤ e·(1 + √2·(σ₁ + σ_(k+1))/(σ_k − σ_(k+1) − e)) + ρ`. This one is first
      order in an error of the kept part (bf16 factors: 3–200x over, but for k = 16 of qdora,
      where σ₁/gap ≈ 300 leaves it 0.3–1.4x); a fixed tolerance cannot hold as the gap closes;
    - the share kept: `√Σ_(i≤k) σᵢ²` moves by at most e and ‖Δ̃‖ by at most δ.
    Here e ≈ 1.3e-5·‖ΔW‖."""
    model, _ = adapted_model(tmp_path, llama3_config(**CONFIG), method)
    for k in (2, 4, 16):
        extraction = extract_lora(model, rank=k)
        for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, QDoRALinear)):
            delta = delta_fp64(layer)
            A, B = extraction.A[name].double(), extraction.B[name].double()
            assert extraction.ranks[name] == k and A.shape == (k, layer.in_features)  # rank <= k
            bound = delta_bound(layer, delta)
            err = (layer_delta(layer).double() - delta).abs()
            assert (err <= bound).all(), f"{name}: ΔW's fp32 input {(err / bound).max():.2f}x its bound"
            norm, input_err, eps = delta.norm(), bound.norm(), svd_eps(delta.shape)
            e = input_err + eps * (norm + input_err)
            S = torch.linalg.svdvals(delta)
            tail = S[k:].pow(2).sum().sqrt()
            ours, rounding = B @ A, 4 * U32 * (B.abs() @ A.abs()).norm()
            assert (delta - ours).norm() <= tail + 2 * e + rounding, f"{name} rank {k}: not optimal"
            gap = S[k - 1] - S[k] - e
            if gap > 0:
                near = e * (1 + 2 ** 0.5 * (S[0] + S[k]) / gap) + rounding
                assert (ours - best_rank_k(delta, k)).norm() <= near, f"{name} rank {k}: not the truncation"
            kept, x = 1 - (tail / norm) ** 2, (e / norm).item()
            low, high = ((kept.sqrt() - x).clamp_min(0) / (1 + x)) ** 2, ((kept.sqrt() + x) / (1 - x)) ** 2
            assert low <= extraction.kept[name] <= high, (name, k, extraction.kept[name], kept.item())
            if method in ("qlora", "lora") and k >= 4:  # ΔW = s·B·A has rank r=4: exact from rank 4 on
                # (tail_k(ΔW) = 0: the optimality bound is ‖ΔW − ours‖ <= 2e + ρ.) All of ‖Δ̃ + E‖² is
                # kept but a tail of at most e: |kept − 1| <= 2ε + ε² + (e/‖Δ̃‖)²
                x_in = (input_err / norm).item()
                assert abs(extraction.kept[name] - 1) <= 2 * eps + eps ** 2 + (x / (1 - x_in)) ** 2


def test_the_randomized_svd_matches_the_exact_one():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(300, 60, generator=g))
    V, _ = torch.linalg.qr(torch.randn(200, 60, generator=g))
    S = 0.8 ** torch.arange(60, dtype=torch.float32)               # a decaying spectrum, as ΔW's is
    delta = U @ torch.diag(S) @ V.T + 1e-4 * torch.randn(300, 200, generator=g)
    exact = truncated_svd(delta, 16, exact=True)
    fast = truncated_svd(delta, 16, exact=False)
    assert_close(fast[1], exact[1], 1e-4, "singular values")
    optimal = (delta - exact[0] @ torch.diag(exact[1]) @ exact[2].T).norm()
    assert (delta - fast[0] @ torch.diag(fast[1]) @ fast[2].T).norm() <= 1.001 * optimal
    assert all(torch.equal(a, b) for a, b in zip(fast, truncated_svd(delta, 16, exact=False)))  # deterministic


@pytest.mark.parametrize("method", ["qdora", "lora"])
def test_peft_serves_the_written_adapter_on_the_base(tmp_path, method):
    """At full rank the extraction is the exact change: PEFT's LoRA on the base the adapter was
    trained on (NF4 for qdora, plain for lora) gives the adapted model's logits."""
    peft = pytest.importorskip("peft")
    model, _ = adapted_model(tmp_path, llama3_config(**CONFIG), method)
    extraction = extract_lora(model, energy=1.0, max_rank=64)   # all of each change: exact
    for name, kept in extraction.kept.items():
        # every singular value of Δ̃ + E (svd_eps) kept, over ‖Δ̃‖²: (‖Δ̃ + E‖/‖Δ̃‖)², within (1 ± ε)²
        eps = svd_eps((model.get_submodule(name).out_features, model.get_submodule(name).in_features))
        assert abs(kept - 1) <= 2 * eps + eps ** 2, (name, kept)
    path = save_lora(extraction, tmp_path / "lora", base_model_name_or_path=str(tmp_path / "base"))
    config = json.loads((path / "adapter_config.json").read_text())
    # what multi-LoRA servers (vLLM) require: plain LoRA, a supported rank, no DoRA or bias tensors,
    # the modules' short names, nothing else trained
    assert (config["peft_type"], config["use_dora"]) == ("LORA", False) and config["lora_alpha"] == config["r"]
    assert config["bias"] == "none" and not config["modules_to_save"]
    assert config["alpha_pattern"] == config["rank_pattern"]       # every scaling 1
    # vLLM's PEFTHelper reads r and lora_alpha only: one scaling lora_alpha / r, here each layer's own
    assert config["lora_alpha"] / config["r"] == 1 and not config["use_rslora"]
    assert extraction.vllm_max_lora_rank() == 64 >= max(extraction.ranks.values())
    assert config["target_modules"] == ["down_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    from safetensors import safe_open
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    base, _ = load_model(tmp_path / "base", method=method, cfg=model.qdora_config, add=False, progress=False)
    served = peft.PeftModel.from_pretrained(base, path).eval()
    assert_close(logits(served), logits(model), FP32_TOL, "PEFT-served LoRA")


def test_energy_chooses_each_layers_rank(tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = adapted_model(tmp_path, llama3_config(**CONFIG), "qdora")
    extraction = extract_lora(model, energy=0.9, max_rank=32)
    assert all(kept >= 0.9 or extraction.ranks[n] == 32 for n, kept in extraction.kept.items())
    for name, k in extraction.ranks.items():  # the smallest such rank
        layer = model.get_submodule(name)
        S = torch.linalg.svdvals(delta_fp64(layer))
        share = (S[:k - 1] ** 2).sum() / (S ** 2).sum()
        assert k == 1 or share < 0.9
    assert len(set(extraction.ranks.values())) > 1
    path = save_lora(extraction, tmp_path / "lora")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]
    base, _ = load_model(tmp_path / "base", method="qdora", cfg=model.qdora_config, add=False, progress=False)
    served = peft.PeftModel.from_pretrained(base, path).eval()   # PEFT reads the per-layer ranks
    lora_ab = {n: (m.lora_A["default"].weight, m.lora_B["default"].weight) for n, m in served.named_modules()
               if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    for name, k in extraction.ranks.items():
        A, B = lora_ab[f"base_model.model.{name}"]
        assert A.shape[0] == k and torch.equal(B @ A, extraction.B[name] @ extraction.A[name])


@pytest.mark.parametrize("kw", [dict(magnitude_only_modules=("o_proj",)), dict(direction="vera")],
                         ids=["magnitude-only", "vera"])
def test_changes_that_are_not_low_rank_are_extracted_too(tmp_path, kw):
    model, _ = adapted_model(tmp_path, llama3_config(**CONFIG), "qdora", **kw)
    low, high = extract_lora(model, rank=4), extract_lora(model, rank=24)
    for name in low.ranks:
        assert high.kept[name] >= low.kept[name] - 1e-6
    full = extract_lora(model, energy=1.0, max_rank=64)
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, QDoRALinear)):
        assert_close(full.B[name].double() @ full.A[name].double(), delta_fp64(layer), 1e-4, name)


def test_merge_format_lora_through_the_command_line(tmp_path, capsys):
    pytest.importorskip("peft")
    from qdora import save_adapter
    from qdora.cli import main
    model, _ = adapted_model(tmp_path, llama3_config(**CONFIG), "qdora")
    with torch.no_grad():  # a trained-like size: B·A small beside W0, so the change is mostly low-rank
        for layer in (m for m in model.modules() if isinstance(m, QDoRALinear)):
            layer.lora_B.mul_(0.1)
            layer.magnitude_delta.mul_(0.1)
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "lora"
    argv = ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
            "--format", "lora"]
    assert main(argv + ["--rank", "8", "--check", "--check-texts", "2", "--check-json", str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    assert "LoRA adapter (10 layers, r=8" in printed and "adapted → LoRA on the original base" in printed
    assert "verdict: passed" in printed and "the adapter's effect kept (held-out texts" in printed
    report = json.loads((tmp_path / "c.json").read_text())
    assert set(report) >= {"adapted", "original", "base", "adapter", "verdict", "extraction"}
    # rank 8 of a rank-4 DoRA change keeps most of its effect: the LoRA drifts less than the adapter moves
    assert report["adapted"]["held-out"]["tv_mean"] < report["adapter"]["held-out"]["tv_mean"]
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "extraction.json"]

    bad = [(["--rank", "0"], "--rank 0 must be a positive integer"),
           (["--rank", "40"], "--rank 40 exceeds model.layers.0.self_attn.k_proj's smaller side (32)"),
           (["--energy", "1.5"], "--energy 1.5 must be in (0, 1]"),
           (["--rank", "8", "--energy", "0.9"], "give --rank K or --energy F (one of them)"),
           (["--rank", "8", "--quant", "q8_0"], "--quant does not apply to --format lora")]
    for extra, message in bad:
        assert main(argv[:-2] + ["--out", str(tmp_path / "x"), "--format", "lora"] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    assert main(argv[:-2] + ["--out", str(tmp_path / "x"), "--format", "nf4", "--rank", "8"]) == 2
    assert "--rank applies to --format lora and gguf-lora only" in capsys.readouterr().err
    full = argv.copy()
    full[full.index("--adapter") + 1] = str(tmp_path / "base")  # a whole model, as a full fine-tune writes
    full[full.index("--out") + 1] = str(tmp_path / "x")
    assert main(full + ["--rank", "8"]) == 2
    assert "is a full fine-tune (a whole model, no adapter)" in capsys.readouterr().err
    from models import build, save_tokenizer
    other = llama3_config(**{**CONFIG, "hidden_size": 128})
    build(other).save_pretrained(tmp_path / "other")
    save_tokenizer(tmp_path / "other", other.vocab_size)
    capsys.readouterr()
    wrong = argv[:-2] + ["--out", str(tmp_path / "x"), "--format", "lora", "--rank", "8"]
    wrong[wrong.index("--model") + 1] = str(tmp_path / "other")
    assert main(wrong) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained on another base model (hidden_size 64 in the adapter's base, 128" in err[0]
    assert not (tmp_path / "x").exists()


def _gguf_lora(tmp_path, **extract):
    gguf = pytest.importorskip("gguf")
    from qdora.export.lora import save_gguf_lora
    model, tok = adapted_model(tmp_path, llama3_config(**CONFIG), "qdora")
    extraction = extract_lora(model, **extract)
    path = save_gguf_lora(extraction, model.config, tmp_path / "gguf-lora")
    return gguf, model, tok, extraction, path


def test_gguf_lora_is_llama_cpps_lora_file(tmp_path):
    """What llama.cpp's convert_lora_to_gguf.py writes: an adapter GGUF of type lora with alpha, and
    per base tensor `<gguf name>.lora_a` / `.lora_b`; q/k rows permuted as their weights are, and
    `(alpha / k)·lora_b·lora_a` each layer's extracted change (per-layer ranks included)."""
    from qdora.export.gguf import permute_qk
    gguf, model, _, extraction, path = _gguf_lora(tmp_path, energy=0.9, max_rank=16)
    reader = gguf.GGUFReader(path)

    def field(key):
        f = reader.fields[key]
        value = f.parts[f.data[0]]
        return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else value[0]
    kinds = (field("general.type"), field("adapter.type"), field("general.architecture"))
    assert kinds == ("adapter", "lora", "llama")
    alpha = field("adapter.lora.alpha")
    tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    assert len(tensors) == 2 * len(extraction.ranks)
    for module, k in extraction.ranks.items():
        layer, _, proj = module.removeprefix("model.layers.").partition(".")
        stem = f"blk.{layer}.{names[proj]}.weight"
        A, B = tensors[f"{stem}.lora_a"], tensors[f"{stem}.lora_b"]
        assert A.shape == (k, model.get_submodule(module).in_features)
        want = extraction.B[module] @ extraction.A[module]
        if proj in ("self_attn.q_proj", "self_attn.k_proj"):
            want = permute_qk(want, 4 if proj.endswith("q_proj") else 2)
        assert_close((alpha / k) * B @ A, want, 1e-5, stem)
    assert len(set(extraction.ranks.values())) > 1  # per-layer ranks, carried by lora_b


def test_llama_cpp_serves_the_gguf_lora_as_the_merged_model(tmp_path):
    """llama.cpp (llama-cpp-python) with the base GGUF and the LoRA GGUF gives the logits of the same
    change merged into one GGUF (both f32)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="no llama.cpp runtime (llama-cpp-python) installed")
    import numpy as np
    from test_export import adapt, make_base

    from qdora.export.gguf import save_gguf
    from qdora.export.lora import save_gguf_lora
    make_base(tmp_path / "base", llama3_config(**{**CONFIG, "vocab_size": 420}))
    model, tok = adapt(tmp_path / "base")
    extraction = extract_lora(model, energy=0.9, max_rank=16)           # per-layer ranks too
    lora = save_gguf_lora(extraction, model.config, tmp_path / "gguf-lora")
    base_file = save_gguf(model, tmp_path / "base-gguf", tok, quant="f32", adapted=False)
    # the reference: the same factors as a PEFT adapter, served by PEFT on the same NF4 base in fp32
    peft = pytest.importorskip("peft")
    save_lora(extraction, tmp_path / "lora")
    plain, _ = load_model(tmp_path / "base", method="qdora", cfg=model.qdora_config, add=False, progress=False)
    served = peft.PeftModel.from_pretrained(plain, tmp_path / "lora").eval()
    ids = tok("Question: what is 12 + 7? Answer: the sum is 19.").input_ids
    with torch.no_grad():
        want = served(torch.tensor([ids])).logits[0].float()
    outs = []
    for kw in (dict(model_path=str(base_file), lora_path=str(lora)), dict(model_path=str(base_file))):
        llm = llama_cpp.Llama(**kw, logits_all=True, n_ctx=64, verbose=False)
        llm.eval(ids)
        outs.append(torch.from_numpy(np.array(llm.scores[:len(ids)])).float())
    assert (outs[0] - outs[1]).abs().max() > 0.05                       # the LoRA is applied
    assert_close(outs[0], want, 1e-3, "llama.cpp: base GGUF + LoRA GGUF vs PEFT serving the same LoRA")
