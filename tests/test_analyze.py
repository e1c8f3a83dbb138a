import csv
import math

import pytest
import torch
from models import build, llama2_config

from qdora import AdapterConfig, load_model, save_adapter
from qdora.eval.harness.analyze import analyze, delta_m_d, fit, main


def test_delta_m_d_hand_computed():
    W0 = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    Wt = torch.tensor([[6.0, 8.0], [0.0, 1.0]])
    # row 0: norm 5 -> 10, same direction; row 1: norm 1 -> 1, orthogonal
    dm, dd = delta_m_d(W0, Wt)
    assert dm == pytest.approx((5 + 0) / 2) and dd == pytest.approx((0 + 1) / 2)
    dm, dd = delta_m_d(W0, -W0)  # opposite direction, same norms
    assert dm == 0 and dd == pytest.approx(2.0)


def test_fit_slope_and_correlation():
    rows = [{"module": "q", "layer": k, "delta_d": x, "delta_m": 3 - 2 * x} for k, x in enumerate((0.0, 1.0, 2.0))]
    stats = fit(rows)
    assert stats["slope"] == pytest.approx(-2.0) and stats["correlation"] == pytest.approx(-1.0)
    assert math.isnan(fit(rows[:1])["slope"])


def test_full_checkpoint_and_adapter(tmp_path):
    base = build(llama2_config())
    base.save_pretrained(tmp_path / "base")
    with torch.no_grad():  # "full fine-tuning": scale layer 0's q_proj rows by 2 (direction unchanged)
        base.model.layers[0].self_attn.q_proj.weight.mul_(2)
    base.save_pretrained(tmp_path / "full")
    rows = analyze(tmp_path / "base", [("full", str(tmp_path / "full"))], modules=("q_proj",))
    by_layer = {r["layer"]: r for r in rows}
    norms = build(llama2_config()).model.layers[0].self_attn.q_proj.weight.double().norm(dim=1)
    assert by_layer[0]["delta_m"] == pytest.approx(norms.mean().item(), rel=1e-6)
    assert by_layer[0]["delta_d"] == pytest.approx(0.0, abs=1e-7)
    assert by_layer[1]["delta_m"] == 0 and by_layer[1]["delta_d"] == pytest.approx(0.0, abs=1e-7)

    model, _ = load_model(tmp_path / "base", method="qdora", cfg=AdapterConfig(r=4, alpha=8), progress=False)
    layer = model.model.layers[1].self_attn.v_proj
    with torch.no_grad():  # magnitude only (m stays positive): ΔD stays 0, ΔM is the mean |Δm|
        layer.magnitude_delta.copy_(0.3 * layer.base_norm * torch.linspace(-1, 1, layer.out_features))
    save_adapter(model, tmp_path / "adapter")
    rows = analyze(tmp_path / "base", [("qdora", str(tmp_path / "adapter"))], modules=("v_proj",))
    r = next(r for r in rows if r["layer"] == 1)
    expected = layer.magnitude_delta.detach().double().abs().mean().item()
    assert r["delta_m"] == pytest.approx(expected, rel=1e-4) and r["delta_d"] == pytest.approx(0.0, abs=1e-6)


def test_cli_writes_csv_and_plot(tmp_path, capsys):
    build(llama2_config()).save_pretrained(tmp_path / "base")
    tuned = build(llama2_config(), seed=1)
    tuned.save_pretrained(tmp_path / "tuned")
    assert main(["--base", str(tmp_path / "base"), "--tuned", f"t1={tmp_path / 'tuned'}", "--out",
                 str(tmp_path / "out")]) == 0
    rows = list(csv.DictReader((tmp_path / "out" / "delta_md.csv").open()))
    assert len(rows) == 4 and {r["module"] for r in rows} == {"q_proj", "v_proj"}
    assert all(float(r["delta_d"]) > 0 for r in rows)
    assert "slope" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "out" / "delta_md.png").stat().st_size > 1000
