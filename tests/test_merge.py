"""Dequantize-merge. The adapter is made to matter (m scaled, B random) before comparing."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_close
from models import build, llama2_config, llama3_config, save_tokenizer

from qdora import AdapterConfig, QDoRALinear, load_model, merge_and_save, merged_weight
from qdora.eval.bench.memory import peak_bytes

IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(5))
U32 = 2.0 ** -24  # fp32 unit roundoff


def gamma(k: int) -> float:
    """γ_k = k·u/(1 − k·u): the relative error bound of a k-term fp32 dot product (Higham §3.1)."""
    return k * U32 / (1 - k * U32)


def merged_weight_bound(W0, A, B, s, m=None):
    """Elementwise bound on |`merged_weight` in fp32 − the fp64 formula|, from the fp64 values it
    reads (`m=None`: LoRA). `V = W0 + s·B·A` is one addmm (r products summed, scaled by s, added to
    W0): within `E = γ_(r+2)·(|W0| + s·|B|·|A|)`. DoRA scales each row by `g = m/‖V̂‖`: the norm is
    a dot of `in` terms and a sqrt (γ_in/2 + u relative), off from ‖V‖ by at most ‖E‖ of the row
    (triangle inequality); the division and the product round once each. So `|Ŵ' − W'| ≤ |g|·E +
    |W'|·(γ_in/2 + 3u + ‖E‖_row/‖V‖_row)`, 1.01 for the second-order terms."""
    E = gamma(B.shape[1] + 2) * (W0.abs() + s * B.abs() @ A.abs())
    if m is None:
        return E
    V = W0 + s * B @ A
    n = V.norm(dim=1, keepdim=True)
    g = m[:, None] / n
    rel = gamma(W0.shape[1]) / 2 + 3 * U32 + E.norm(dim=1, keepdim=True) / n
    return (g.abs() * E + (g * V).abs() * rel) * 1.01


def assert_within(actual, expected, bound, what):
    err = (actual.double() - expected).abs()
    assert (err <= bound).all(), f"{what}: error {(err / bound).max().item():.2f}x its bound"


def adapted_model(tmp_path, config, method="qdora", **cfg_kw):
    build(config).save_pretrained(tmp_path / "base", max_shard_size="200KB")
    save_tokenizer(tmp_path / "base", config.vocab_size)
    cfg = AdapterConfig(method=method, r=4, alpha=8, dropout=0.0, adapter_dtype="float32", **cfg_kw)
    model, tok = load_model(tmp_path / "base", method=method, cfg=cfg, progress=False)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, QDoRALinear):
                if layer.lora_B is not None:
                    layer.lora_B.normal_(0, 0.2)
                if layer.use_dora:
                    layer.set_magnitude(layer.magnitude * (1 + 0.5 * torch.rand(layer.out_features)))
    return model.eval(), tok


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def load_plain(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.mark.parametrize("config", [llama2_config(), llama3_config(tie_word_embeddings=True)],
                         ids=["llama2", "llama3-tied"])
@pytest.mark.parametrize("method", ["qdora", "qlora", "dora"])
def test_merged_checkpoint_reproduces_the_adapted_model(tmp_path, config, method):
    model, tok = adapted_model(tmp_path, config, method)
    adapted = logits(model)
    base = logits(load_plain(tmp_path / "base"))
    assert (adapted - base).abs().max() > 0.05  # the adapter matters
    # fp32 merge: the only difference is summation order. Source: fp32 rounding through 2 layers.
    merge_and_save(model, tmp_path / "fp32", tokenizer=tok, dtype=torch.float32, max_shard_size="100KB")
    assert_close(logits(load_plain(tmp_path / "fp32")), adapted, 1e-5, "fp32-merged logits")
    # bf16 merge (the default): weights rounded to bf16 (unit roundoff 3.9e-3), logits within a few of it.
    merge_and_save(model, tmp_path / "bf16", tokenizer=tok)
    merged = load_plain(tmp_path / "bf16", dtype=None)
    assert next(merged.parameters()).dtype == torch.bfloat16
    assert_close(logits(merged.float()), adapted, 2e-2, "bf16-merged logits")
    if config.tie_word_embeddings:
        assert merged.lm_head.weight is merged.model.embed_tokens.weight


def test_checkpoint_layout_and_config(tmp_path):
    model, tok = adapted_model(tmp_path, llama3_config())
    out = merge_and_save(model, tmp_path / "merged", tokenizer=tok, max_shard_size="150KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    from safetensors import safe_open
    total = 0
    for s in shards:
        with safe_open(str(out / s), "pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == s
                total += f.get_tensor(k).numel() * 2
    assert total == index["metadata"]["total_size"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not any(p.name.endswith(".tmp") or ".tmp-" in p.name for p in tmp_path.iterdir())
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        merge_and_save(model, out)


def test_plain_transformers_loads_it_without_qdora(tmp_path):
    model, tok = adapted_model(tmp_path, llama2_config())
    merge_and_save(model, tmp_path / "merged", tokenizer=tok, dtype=torch.float32)
    torch.save(IDS, tmp_path / "ids.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r}, dtype=torch.float32).eval()\n"
        f"AutoTokenizer.from_pretrained({str(tmp_path / 'merged')!r})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
        "assert not any(k == 'qdora' or k.startswith('qdora.') for k in sys.modules), 'qdora was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(torch.load(tmp_path / "logits.pt"), logits(model), 1e-5, "logits in a process without qdora")


def test_merge_onto_the_original_weights(tmp_path):
    model, tok = adapted_model(tmp_path, llama2_config())
    merge_and_save(model, tmp_path / "nf4", dtype=torch.float32)
    merge_and_save(model, tmp_path / "orig", dtype=torch.float32, original_checkpoint=tmp_path / "base")
    a, b = logits(load_plain(tmp_path / "nf4")), logits(load_plain(tmp_path / "orig"))
    # Different by the NF4 quantization error only: nonzero, and far smaller than the logits.
    diff = (a - b).abs().max().item()
    assert 1e-4 < diff < 0.5 * a.abs().max().item()
    layer = model.model.layers[0].self_attn.q_proj
    from qdora.models.loading import CheckpointReader
    W0 = CheckpointReader(tmp_path / "base").get("model.layers.0.self_attn.q_proj.weight").double()
    A, B, m = layer.lora_A.double(), layer.lora_B.double(), layer.magnitude.double()
    W = W0 + layer.scaling * B @ A
    expected = W * (m / W.norm(dim=1))[:, None]
    assert_within(merged_weight(layer, torch.float64, W0.float()), expected,
                  merged_weight_bound(W0, A, B, layer.scaling, m), "merged on original")


def test_merged_weight_matches_the_fp64_formula():
    from torch import nn

    from qdora import linear4bit_from_linear
    layer = QDoRALinear(linear4bit_from_linear(nn.Linear(1151, 70)), r=8, alpha=16, adapter_dtype=torch.float32,
                        block_rows=64)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
        layer.magnitude_delta.normal_(0, 0.3)
    W0, A, B, m = (t.double() for t in (layer.dequantized_base(), layer.lora_A, layer.lora_B, layer.magnitude))
    W = W0 + layer.scaling * B @ A
    expected = W * (m / W.norm(dim=1))[:, None]
    # The bound (merged_weight_bound) is ~4e-5 of each entry at in = 1151, dominated by the
    # worst-case γ_in/2 of the row norm. Real bugs land outside it: the norm taken of a bf16 copy
    # of V is 5x the bound, B or the output in bf16 100x and more, the norm of W0 alone 10⁴x.
    assert_within(merged_weight(layer, torch.float64), expected, merged_weight_bound(W0, A, B, layer.scaling, m),
                  "merged weight")


def test_merge_streams_one_layer_at_a_time(tmp_path):
    config = llama3_config(hidden_size=128, intermediate_size=512, num_hidden_layers=4, vocab_size=256)
    model, _ = adapted_model(tmp_path, config)
    full_bf16 = sum(p.numel() for p in load_plain(tmp_path / "base").parameters()) * 2
    largest_fp32 = 512 * 128 * 4
    peak = peak_bytes(lambda: merge_and_save(model, tmp_path / "merged", max_shard_size="100MB"))
    # One merged layer in fp32 plus its block temporaries and bf16 copy; never the whole model.
    assert peak < 4 * largest_fp32 < full_bf16, (peak, largest_fp32, full_bf16)


def test_cli_merge_equals_the_library_merge(tmp_path):
    from qdora import save_adapter
    from qdora.cli import main
    model, tok = adapted_model(tmp_path, llama3_config())
    save_adapter(model, tmp_path / "adapter")
    merge_and_save(model, tmp_path / "lib", tokenizer=tok, dtype=torch.float32)
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "cli"), "--dtype", "float32"]) == 0
    assert torch.equal(logits(load_plain(tmp_path / "cli")), logits(load_plain(tmp_path / "lib")))


def test_cli_merge_reports_the_original_weights_logit_difference(tmp_path, capsys):
    from qdora import save_adapter
    from qdora.cli import main
    from qdora.export.merge import logit_difference
    model, tok = adapted_model(tmp_path, llama2_config())
    save_adapter(model, tmp_path / "adapter")
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "orig"), "--dtype", "float32", "--original", "--check"]) == 0
    out = capsys.readouterr().out
    assert "merged on the original weights vs the adapted NF4 model" in out
    d = logit_difference(model, tmp_path / "orig", tok, text="w1 w2 w3 w4 w5 w6")
    assert 1e-4 < d["max_rel"] < 0.5  # the NF4 quantization error, visible but small


def test_no_export_replaces_the_checkpoint_it_merges_onto(tmp_path):
    # overwrite=True allows replacing an earlier result, never the export's own input.
    from qdora.export.gguf import save_gguf
    from qdora.export.nf4 import save_nf4
    model, tok = adapted_model(tmp_path, llama2_config())
    before = {p.name: p.read_bytes() for p in (tmp_path / "base").iterdir()}
    for export in (merge_and_save, save_nf4):
        for out in (tmp_path / "base", tmp_path):
            with pytest.raises(ValueError, match="would replace this command's own input"):
                export(model, out, tokenizer=tok, original_checkpoint=tmp_path / "base", overwrite=True)
    with pytest.raises(ValueError, match="out_dir .* is original_checkpoint"):
        save_gguf(model, tmp_path / "base", tok, original_checkpoint=tmp_path / "base", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "base").iterdir()} == before


def test_check_ends_with_a_verdict_against_the_adapters_own_effect(tmp_path, capsys):
    # A float32 merge keeps the adapter's effect: passed. The same export judged with a bound below its
    # own drift fails with exit status 1, files kept. An export of the unadapted model (NF4 erasing a
    # short fine-tune is that case) drifts by the whole effect.
    from qdora import save_adapter
    from qdora.cli import main
    from qdora.export.drift import verdict
    model, tok = adapted_model(tmp_path, llama3_config())
    save_adapter(model, tmp_path / "adapter")
    args = ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--dtype", "float32"]
    assert main([*args, "--out", str(tmp_path / "ok"), "--check-json", str(tmp_path / "ok.json")]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("verdict: passed: the export drifts ")
    report = json.loads((tmp_path / "ok.json").read_text())
    drift, effect = report["adapted"]["held-out"]["tv_mean"], report["adapter"]["held-out"]["tv_mean"]
    assert report["verdict"]["passed"] is True and 0 <= drift < 0.5 * effect
    assert main([*args, "--out", str(tmp_path / "strict"), "--max-drift", f"{0.5 * drift / effect:.3e}"]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1].startswith("verdict: FAILED: the export drifts ")
    assert "failed --check (kept" in captured.err and (tmp_path / "strict" / "config.json").is_file()
    # the verdict's arithmetic on a report whose export lost the adapter: drift = effect
    lost = {"adapted": {"held-out": {"tv_mean": effect}}, "adapter": {"held-out": {"tv_mean": effect}}}
    assert verdict(lost, 0.5)[0] is False and "drifts 1× the adapter's own effect" in verdict(lost, 0.5)[1]
    none = {"adapted": {"held-out": {"tv_mean": 0.01}}, "adapter": {"held-out": {"tv_mean": 0.0}}}
    assert verdict(none, 0.5)[0] is None


def test_a_killed_exports_temporary_folder_does_not_live_on(tmp_path):
    # A merge killed mid-write leaves `<out>.tmp-<pid>`; the next write of the same folder removes it
    # once its process is gone, and leaves a live process's alone.
    import subprocess
    import sys

    from qdora.core.safetensors_io import atomic_dir
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = tmp_path / f"merged.tmp-{int(dead.stdout)}"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f"merged.tmp-{live.pid}"
        for folder in (stale, running):
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"partial")
        with atomic_dir(tmp_path / "merged") as tmp:
            (tmp / "config.json").write_text("{}")
        assert not stale.exists() and running.is_dir()
        assert (tmp_path / "merged" / "config.json").is_file()
    finally:
        live.kill()
        live.wait()


def test_replacing_a_folder_never_removes_a_dot_old_it_did_not_make(tmp_path):
    # `<out>.old` may be anyone's backup: an overwrite moves the previous folder to `<out>.old-<pid>`
    # and removes only that (and, once the new folder is in place, those of processes that are gone).
    import subprocess
    import sys

    from qdora.core.safetensors_io import atomic_dir
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    backup, crashed = tmp_path / "merged.old", tmp_path / f"merged.old-{dead}"
    for folder in (backup, crashed, tmp_path / "merged"):
        folder.mkdir()
        (folder / "config.json").write_text(f'"{folder.name}"')
    with atomic_dir(tmp_path / "merged") as tmp:
        (tmp / "config.json").write_text('"new"')
    assert (tmp_path / "merged" / "config.json").read_text() == '"new"'
    assert (backup / "config.json").read_text() == '"merged.old"' and not crashed.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "merged.old"]


def test_frozen_nf4_layers_with_partial_row_blocks_compute_what_the_merge_holds(tmp_path):
    """llama2's down_proj is 64 x 176: its rows are not whole NF4 blocks (64), where bitsandbytes
    0.50.2's CPU forward is wrong. Left frozen (not targeted), it must still compute the NF4 weight
    that the merge writes: the merged fp32 checkpoint reproduces the adapted model (summation order)."""
    model, tok = adapted_model(tmp_path, llama2_config(), target_modules=("q_proj", "v_proj"))
    frozen = model.model.layers[0].mlp.down_proj
    assert type(frozen).__name__ == "ExactLinear4bit" and frozen.in_features == 176
    assert type(model.model.layers[0].self_attn.o_proj).__name__ == "Linear4bit"  # aligned: bitsandbytes' own
    merge_and_save(model, tmp_path / "fp32", tokenizer=tok, dtype=torch.float32)
    assert_close(logits(load_plain(tmp_path / "fp32")), logits(model), 1e-5, "fp32-merged logits")
