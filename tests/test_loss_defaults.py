"""The chunked loss where it is the default: `qdora train` (and so `qdora eval`'s runs, which train
through it), `qdora.QDoRATrainer` / `AdapterCheckpoints`, and beside TRL's `SFTTrainer`; the same
loss curves with it on and off, and its settings checked before any work."""

import json

import pytest
import torch
from models import build, llama3_config, save_bpe_tokenizer

import qdora
from qdora import AdapterConfig, load_model
from qdora.data.examples import DEMO_DATA
from qdora.models import head_loss
from qdora.models.head_loss import find_chunked_loss
from qdora.train.loop import TrainConfig, read_metrics, train

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
from test_hf_trainer import tokenized  # noqa: E402  (the same rows as the Trainer tests)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loss_defaults")
    records = json.loads((DEMO_DATA / "arc_easy_train.json").read_text())[:16]
    (root / "data.json").write_text(json.dumps(records))
    build(llama3_config(vocab_size=512, intermediate_size=128, max_position_embeddings=640)).save_pretrained(
        root / "model")
    texts = [r["instruction"] + " " + r["output"] for r in records]
    save_bpe_tokenizer(root / "model", texts + ["Below is an instruction ### Response:"])
    return root, texts


@pytest.fixture
def calls(monkeypatch):
    """Every call of the chunked cross-entropy from a model's forward."""
    seen = []
    original = head_loss.chunked_cross_entropy

    def counted(*args, **kwargs):
        seen.append(kwargs.get("chunk_tokens"))
        return original(*args, **kwargs)

    monkeypatch.setattr(head_loss, "chunked_cross_entropy", counted)
    return seen


def config(setup, out, **kw):
    root, _ = setup
    base = dict(model=str(root / "model"), data=str(root / "data.json"), out=str(out), method="qdora", r=4, alpha=8,
                dropout=0.0, lr=5e-3, max_steps=4, batch_size=4, grad_accum=2, cutoff_len=640, warmup_steps=1,
                packing=True, val_split=0.25, eval_every=2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_qdora_train_gives_the_same_curve_with_the_chunked_loss_on_and_off(setup, tmp_path, calls):
    assert TrainConfig(model="m", data="d", out="o").chunked_loss  # the default
    on = train(config(setup, tmp_path / "on", loss_chunk_tokens=7))
    assert calls and set(calls) == {7} and find_chunked_loss(on["model"]).chunk_tokens == 7
    count = len(calls)
    off = train(config(setup, tmp_path / "off", chunked_loss=False))
    assert len(calls) == count and find_chunked_loss(off["model"]) is None
    a, b = read_metrics(tmp_path / "on"), read_metrics(tmp_path / "off")
    assert len(a) == len(b) == 4 and sum("val_loss" in m for m in a) == 2
    for key in ("loss", "grad_norm", "val_loss"):
        assert [m[key] for m in a if key in m] == pytest.approx([m[key] for m in b if key in m], rel=1e-5), key
    # a run out of memory may resume with smaller chunks: the setting is not the run's
    train(config(setup, tmp_path / "on", loss_chunk_tokens=3, max_steps=5, resume=True))
    assert calls[-1] == 3 and len(read_metrics(tmp_path / "on")) == 5


def refused_train(setup, tmp_path, capsys, *flags) -> str:
    """`qdora train` with `flags` on the tiny setup: exit status 2, one error line, nothing written; the line."""
    from qdora.cli import main
    root, _ = setup
    rc = main(["train", "--model", str(root / "model"), "--data", str(root / "data.json"), "--out",
               str(tmp_path / "never"), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert not (tmp_path / "never").exists()
    return err


def test_bad_chunk_settings_are_refused_before_any_work(setup, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"loss_chunk_tokens=-3 must be an integer >= 1"):
        TrainConfig(model="m", data="d", out="o", loss_chunk_tokens=-3)
    with pytest.raises(ValueError, match="loss_chunk_tokens=5 sizes the chunked loss, which --no-chunked-loss"):
        TrainConfig(model="m", data="d", out="o", loss_chunk_tokens=5, chunked_loss=False)
    assert "loss_chunk_tokens=-3" in refused_train(setup, tmp_path, capsys, "--loss-chunk-tokens", "-3")
    with pytest.raises(ValueError, match="loss_chunk_tokens=0 must be an integer >= 1"):
        qdora.QDoRATrainer(model=None, loss_chunk_tokens=0)


def test_a_loss_kernel_is_checked_before_any_work(setup, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"loss_kernel='fused' is unknown; use one of torch, liger, cce"):
        TrainConfig(model="m", data="d", out="o", loss_kernel="fused")
    with pytest.raises(ValueError, match=r"loss_kernel='liger' computes the chunked loss, which --no-chunked-loss"):
        TrainConfig(model="m", data="d", out="o", loss_kernel="liger", chunked_loss=False)
    with pytest.raises(ValueError, match=r"loss_chunk_tokens=64 sizes qdora's own chunks; loss_kernel='cce' sizes"):
        TrainConfig(model="m", data="d", out="o", loss_kernel="cce", loss_chunk_tokens=64)
    with pytest.raises(ValueError, match=r"loss_kernel='ccex': use one of torch, liger, cce"):
        qdora.QDoRATrainer(model=None, loss_kernel="ccex")
    if torch.cuda.is_available():
        return
    # on CPU: a library kernel is refused in one line, before the model is loaded
    err = refused_train(setup, tmp_path, capsys, "--loss-kernel", "liger")
    assert "loss_kernel='liger' runs on CUDA; this run is on cpu" in err


def trainer(setup, out, **kw):
    root, texts = setup
    torch.manual_seed(0)
    model, tok = load_model(root / "model", cfg=AdapterConfig(method="qdora", r=4, alpha=8, dropout=0.0),
                            progress=False)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    return qdora.QDoRATrainer(model=model, args=args, train_dataset=tokenized(tok, texts[:12]),
                              eval_dataset=tokenized(tok, texts[12:]), processing_class=tok,
                              data_collator=transformers.DataCollatorForSeq2Seq(tok, padding=True), **kw)


def losses(run):
    return [entry["loss"] for entry in run.state.log_history if "loss" in entry]


def test_qdora_trainer_trains_and_evaluates_with_the_chunked_loss(setup, tmp_path, calls):
    on = trainer(setup, tmp_path / "on", loss_chunk_tokens=5)
    on.train()
    assert calls and set(calls) == {5}
    assert find_chunked_loss(on.model) is None and "forward" not in on.model.__dict__  # only while training
    count = len(calls)
    off = trainer(setup, tmp_path / "off", chunked_loss=False)
    off.train()
    assert len(calls) == count and losses(on) == pytest.approx(losses(off), rel=1e-5) and len(losses(on)) == 3
    chunked, whole = on.evaluate(), off.evaluate()
    assert len(calls) > count and chunked["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-5)
    # a metric that reads the logits gets them: the model's own forward, for those steps
    on.compute_metrics = lambda p: {"vocab": p.predictions.shape[-1]}
    count = len(calls)
    scored = on.evaluate()
    assert scored["eval_vocab"] == 512 and scored["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-5)
    assert len(calls) == count


def test_beside_trls_fused_head_every_call_passes_through(setup, tmp_path, calls):
    trl = pytest.importorskip("trl")
    root, texts = setup

    class QDoRASFTTrainer(qdora.AdapterCheckpoints, trl.SFTTrainer):
        pass

    model, tok = load_model(root / "model", cfg=AdapterConfig(method="qdora", r=4, alpha=8, dropout=0.0),
                            progress=False)
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=2,
                         learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         seed=0, data_seed=0, max_length=96, dataset_text_field="text", disable_tqdm=True, bf16=False)
    run = QDoRASFTTrainer(model=model, args=args, processing_class=tok,
                          train_dataset=datasets.Dataset.from_list([{"text": t} for t in texts[:8]]))
    trls = model.__dict__["forward"]  # TRL's fused head, put on in SFTTrainer.__init__
    run.train()
    assert not calls  # TRL's own chunked head computed every loss
    assert model.__dict__["forward"] is trls
    logged = [e for e in run.state.log_history if "loss" in e]
    assert len(logged) == 2 and all("mean_token_accuracy" in e for e in logged)
