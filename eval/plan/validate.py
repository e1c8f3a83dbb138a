"""The memory planner against measurement: predicted vs measured peak of real training steps on CPU.

For each case a model is built as `qdora train` builds it (fp32 storage and compute on CPU,
adapters by `qdora.add_adapters`, gradient checkpointing enabled the trainer's way, AdamW, gradient
clipping), one step is run so the optimizer states exist (steady state), then a second step
(forward, backward, clip, optimizer step, zero_grad) is measured with the profiler's live-tensor
peak (`qdora.eval.bench.memory.peak_bytes`; process RSS would hide freed heap). Measured peak =
bytes of the model's tensors + optimizer states + the step's peak of newly allocated tensors.
The prediction is `qdora.plan.memory.plan(..., device="cpu")`'s tensor total.

    python -m qdora.eval.plan.validate            # tiny and small Llama shapes, then SmolLM2-135M
    python -m qdora.eval.plan.validate --quick    # the tiny shapes only (seconds)
    python -m qdora.eval.plan.validate --only moe # scaled-down mixtures of experts (Qwen2/3-MoE, OLMoE, Mixtral,
                                                  # GLM-4-MoE: shared experts, dense layers)
    python -m qdora.eval.plan.validate --only chunked  # the chunked loss (qdora.chunked_loss installed)
    python -m qdora.eval.plan.validate --only long  # long rows, the tiled MLP and offloaded activations on and off
    python -m qdora.eval.plan.validate --only gemma # Gemma 3's and 2's layouts: four norms a layer, sliding-window
                                                     # layers, soft-capped attention
    python -m qdora.eval.plan.validate --only gemma --case 4 --case 5 --case 6 --tile-mib 64
                                                     # Gemma 2 with a soft-capped tile's working set at the peak
    python -m qdora.eval.plan.validate --only tiled # tiled layers, where a layer's backward peaks; SmolLM2 to 16K
                                                    # (the profiler's events alone: `measure(how="events")`)
    python -m qdora.eval.plan.validate --only smollm2-32k  # SmolLM2 at 32K tokens, the options on and off
                                                    # (memray's heap peak: `measure(how="heap")`, 25 min a row)
    python -m qdora.eval.plan.validate --published  # the planner beside published figures
    python -m qdora.eval.plan.validate --goal       # long sequences on one card: Llama-3-8B against the anchor
    python -m qdora.eval.plan.validate --start    # the FSDP start, 2 processes (gloo) per case

`--start` checks the plan's FSDP start term (`MemoryPlan.start_bytes`): for each case a checkpoint
is written, `torchrun` starts 2 CPU processes that run `qdora.train.fsdp.build_sharded` on it (stream,
quantize, adapt, shard, layer by layer) under the profiler, and rank 0's peak of live tensor bytes
is set beside the prediction (`device="cpu", gpus=2`). The memory-mapped checkpoint file is not
counted (its pages are the file's). Shapes are chosen so that the peak falls once in the root
phase (large vocabulary) and once in the layer phase (a matrix larger than one quantizer chunk).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import qdora
from qdora.core.config import AdapterConfig
from qdora.core.loss import default_chunk_tokens
from qdora.core.safetensors_io import write_text_atomic
from qdora.eval.bench.memory import heap_peak_bytes, peak_bytes, step_peak_bytes, tensor_bytes
from qdora.eval.common import run_child
from qdora.models.loading import load_model, smollm2_gguf_path
from qdora.models.packed_attention import band_mask
from qdora.models.shapes import SOFTCAP_TILE_BYTES
from qdora.plan.memory import (
    GIB,
    MAX_SEQ_CARDS_GB,
    PlanConfig,
    at_length,
    longest_sequence,
    plan,
    resolve_model,
    shape_from_config,
)
from qdora.train.fsdp import build_sharded, init_process_group
from qdora.train.loop import prepare_for_training
from qdora.train.setup import long_sequence_options, training_attention

# Tiny Llama-2/Llama-3 shapes (as in tests/models.py) and a small one with realistic ratios.
SHAPES = {
    "tiny-llama2": dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "tiny-llama3": dict(vocab_size=1024, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    "small-llama3": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    # A large vocabulary on a narrow model: the loss is the step's peak (the chunked loss's validation).
    "vocab-llama3": dict(vocab_size=32768, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}


# Scaled-down mixtures of experts: the architectures of Qwen3-30B-A3B (per-head q/k norms, normalised
# top-k weights), OLMoE-1B-7B (whole q/k norms) and Mixtral-8x7B (k=2 of 8), every layer routed.
MOE_SHAPES = {
    "tiny-qwen3-moe": ("Qwen3Moe", dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=8,
                                        num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True,
                                        tie_word_embeddings=False)),
    "tiny-olmoe": ("Olmoe", dict(vocab_size=1024, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=4,
                                 tie_word_embeddings=False)),
    "tiny-mixtral": ("Mixtral", dict(vocab_size=1024, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, tie_word_embeddings=False)),
    # Shared experts and dense layers: Qwen2-MoE (a shared expert behind a sigmoid gate, q/k/v biases, raw
    # top-k weights), Qwen3-MoE with dense layers 0 and 2 (`decoder_sparse_step=2`), GLM-4-MoE (a dense first layer,
    # a shared expert, sigmoid routing in 2 groups, q/k/v biases, half the head dimensions rotated).
    "tiny-qwen2-moe": ("Qwen2Moe", dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                        num_experts_per_tok=2, moe_intermediate_size=128,
                                        shared_expert_intermediate_size=384, tie_word_embeddings=False)),
    "tiny-qwen3-moe-dense": ("Qwen3Moe", dict(vocab_size=1024, hidden_size=256, intermediate_size=512,
                                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=64, num_experts=8, num_experts_per_tok=2,
                                              moe_intermediate_size=128, norm_topk_prob=True, decoder_sparse_step=2,
                                              tie_word_embeddings=False)),
    "tiny-glm4-moe": ("Glm4Moe", dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, n_routed_experts=8,
                                      num_experts_per_tok=2, moe_intermediate_size=128, n_shared_experts=1,
                                      first_k_dense_replace=1, n_group=2, topk_group=1, attention_bias=True,
                                      partial_rotary_factor=0.5, tie_word_embeddings=False)),
}


# Other layouts, as (config class, causal LM class, fields): Gemma 3 (text) with four RMSNorms per layer, per-head
# q/k norms, GELU-tanh MLP, scaled embeddings, tied head, three sliding-window layers (qdora_sdpa's blocks) and a
# global one.
ARCH_SHAPES = {
    "small-gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                     dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                          sliding_window=512, layer_types=["sliding_attention"] * 3 + ["full_attention"],
                          tie_word_embeddings=True)),
    # Gemma 2: four norms, GELU-tanh MLP, tied head, soft-capped scores (qdora_softcap's tiles) and final logits,
    # windowed and global layers alternating
    "small-gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
                     dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                          sliding_window=512, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                          layer_types=["sliding_attention", "full_attention"] * 2, tie_word_embeddings=True)),
}


START_SHAPES = {
    "wide-vocab": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                       num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    "tied-llama2": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "wide-mlp": dict(vocab_size=1024, hidden_size=1024, intermediate_size=4096, num_hidden_layers=3,
                     num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
}
START_CASES = [("wide-vocab", "qdora", 16), ("wide-vocab", "qlora", 16), ("tied-llama2", "qdora", 16),
               ("wide-mlp", "qdora", 16), ("wide-mlp", "qlora", 64)]
START_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def _start_config(method: str, r: int):
    return AdapterConfig(method=method, r=r, dropout=0.0, target_modules=START_TARGETS, adapter_dtype="float32")


def start_worker(folder: str, method: str, r: int, out: str) -> None:
    """Under torchrun: the FSDP start on `folder`, measured; rank 0 writes the peak to `out`."""

    device = init_process_group()
    torch.manual_seed(0)
    mapped = frozenset(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    peak = peak_bytes(lambda: build_sharded(folder, _start_config(method, r), device, progress=False),
                      mapped_sizes=mapped)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"peak": peak}))
    dist.destroy_process_group()


def measure_start(name: str, method: str, r: int, workdir) -> dict:
    """Write case `name`'s checkpoint under `workdir`, run the 2-process start, return the row."""

    from transformers import LlamaConfig, LlamaForCausalLM  # heavy, used here only

    folder = Path(workdir) / name
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**START_SHAPES[name], max_position_embeddings=512)).save_pretrained(folder)
    out = Path(workdir) / f"{name}-{method}-{r}.json"
    run_child(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "qdora.eval.plan.validate", "--start-worker", str(folder), method, str(r), str(out)],
              f"start measurement of {name} ({method})", capture=True,
              env={"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}, timeout=900)
    predicted = plan(str(folder), PlanConfig(method=method, r=r, dropout=0.0, device="cpu", gpus=2,
                                             target_modules=START_TARGETS))
    return {"model": name, "method": method, "r": r, "measured_bytes": json.loads(out.read_text())["peak"],
            "predicted_bytes": predicted.start_bytes}


def start_table(rows: list[dict]) -> str:
    out = ["| model | method | r | predicted MiB | measured MiB | error |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['method']} | {r['r']} | {r['predicted_bytes'] / 2**20:.2f} | "
                   f"{r['measured_bytes'] / 2**20:.2f} | {100 * error(r):+.1f}% |")
    return "\n".join(out)


@dataclass(frozen=True)
class Case:
    model: str
    """A key of SHAPES, MOE_SHAPES or ARCH_SHAPES, or `smollm2` (SmolLM2-135M-Instruct, loaded with
    `qdora.load_model`)."""
    cfg: PlanConfig


def _p(method="qdora", r=16, b=2, s=64, ckpt=True, dropout=0.05, **kw) -> PlanConfig:
    return PlanConfig(method=method, r=r, batch_size=b, seq_len=s, gradient_checkpointing=ckpt,
                      dropout=dropout, device="cpu", **kw)


QUICK = [
    Case("tiny-llama3", _p("qdora")), Case("tiny-llama3", _p("qdora", ckpt=False)),
    Case("tiny-llama3", _p("qlora")), Case("tiny-llama3", _p("lora", dropout=0.0, ckpt=False)),
    Case("tiny-llama2", _p("full", b=1, s=128, ckpt=False)), Case("tiny-llama2", _p("qdora", r=8, s=128)),
]
SMALL = [
    Case("small-llama3", _p("qdora", r=16, b=2, s=256)),
    Case("small-llama3", _p("qdora", r=16, b=2, s=256, ckpt=False)),
    Case("small-llama3", _p("qlora", r=16, b=4, s=128, ckpt=False)),
    Case("small-llama3", _p("qdora", r=8, b=1, s=512, target_modules="all", dropout=0.0)),
    Case("small-llama3", _p("lora", r=16, b=2, s=256)),
    Case("small-llama3", _p("full", b=2, s=128)),
]
_MOE_TARGETS = "q_proj,k_proj,v_proj,o_proj,experts"
_MLP_TARGETS = _MOE_TARGETS + ",up_proj,down_proj"  # with the shared MLP's and the dense layers' up, down
MOE = [
    Case("tiny-qwen3-moe", _p("qdora", r=8, b=2, s=64, target_modules=_MOE_TARGETS)),
    Case("tiny-qwen3-moe", _p("qdora", r=8, b=2, s=64, ckpt=False, target_modules=_MOE_TARGETS)),
    Case("tiny-qwen3-moe", _p("qlora", r=8, b=2, s=64, ckpt=False, target_modules="q_proj,k_proj,v_proj")),
    Case("tiny-olmoe", _p("qdora", r=8, b=1, s=128, ckpt=False, target_modules="q_proj,v_proj,experts.down_proj")),
    Case("tiny-mixtral", _p("qlora", r=8, b=2, s=64, ckpt=False, dropout=0.0, target_modules=_MOE_TARGETS)),
    Case("tiny-qwen3-moe", _p("qdora", r=8, b=2, s=64, ckpt=False, target_modules="q_proj,v_proj,gate,experts")),
]
MOE_SHARED = [  # shared experts and dense layers (part of `--only moe`)
    Case("tiny-qwen2-moe", _p("qdora", r=8, b=2, s=64, ckpt=False, target_modules=_MLP_TARGETS)),
    Case("tiny-qwen2-moe", _p("qlora", r=8, b=2, s=64, target_modules="q_proj,k_proj,v_proj,up_proj,down_proj")),
    Case("tiny-qwen3-moe-dense", _p("qdora", r=8, b=2, s=64, ckpt=False,
                                    target_modules=_MOE_TARGETS + ",gate_proj,up_proj,down_proj")),
    Case("tiny-glm4-moe", _p("qdora", r=8, b=2, s=64, ckpt=False, target_modules=_MLP_TARGETS)),
    Case("tiny-glm4-moe", _p("qdora", r=8, b=2, s=64, target_modules=_MLP_TARGETS)),
    Case("tiny-glm4-moe", _p("qlora", r=8, b=1, s=128, ckpt=False, dropout=0.0, target_modules="all")),
]
GEMMA = [  # Gemma 3's layout, every linear adapted, the chunked loss; checkpointing on and off, tiled layers, 2K
    Case("small-gemma3", _p("qdora", r=16, b=1, s=1024, chunked_loss=True, target_modules="all")),
    Case("small-gemma3", _p("qdora", r=16, b=1, s=1024, ckpt=False, chunked_loss=True, target_modules="all")),
    Case("small-gemma3", _p("qdora", r=16, b=1, s=1024, chunked_loss=True, loss_chunk_tokens=256, tiled_layers=True,
                            target_modules="all")),
    Case("small-gemma3", _p("qdora", r=16, b=1, s=2048, chunked_loss=True, target_modules="all")),
    # Gemma 2: its soft-capped attention in tiles of queries (4 MiB of fp32 scores a tile on CPU)
    Case("small-gemma2", _p("qdora", r=16, b=1, s=1024, chunked_loss=True, target_modules="all")),
    Case("small-gemma2", _p("qdora", r=16, b=1, s=1024, ckpt=False, chunked_loss=True, target_modules="all")),
    Case("small-gemma2", _p("qdora", r=16, b=1, s=4096, chunked_loss=True, target_modules="all")),
    Case("small-gemma2", _p("qdora", r=16, b=1, s=16384, chunked_loss=True, target_modules="all")),
]
CHUNKED = [  # the chunked loss (qdora train's default): the default chunk (the whole batch here) and small ones
    Case("vocab-llama3", _p("qdora", r=16, b=1, s=512, chunked_loss=True)),
    Case("vocab-llama3", _p("qdora", r=16, b=1, s=512, chunked_loss=True, loss_chunk_tokens=256)),
    Case("vocab-llama3", _p("qdora", r=16, b=2, s=1024, chunked_loss=True)),
    Case("vocab-llama3", _p("qdora", r=16, b=2, s=1024, chunked_loss=True, loss_chunk_tokens=512)),
    Case("vocab-llama3", _p("qdora", r=16, b=2, s=1024, ckpt=False, chunked_loss=True, loss_chunk_tokens=512)),
    Case("vocab-llama3", _p("lora", r=16, b=2, s=1024, dropout=0.0, chunked_loss=True, loss_chunk_tokens=512)),
    Case("vocab-llama3", _p("full", b=1, s=1024, chunked_loss=True)),
    Case("vocab-llama3", _p("qdora", r=16, b=2, s=1024)),  # the same step with the whole logits, for scale
    Case("small-llama3", _p("qdora", r=16, b=2, s=256, chunked_loss=True)),
    Case("small-llama3", _p("qdora", r=16, b=2, s=256, chunked_loss=True, loss_chunk_tokens=64)),
    Case("small-llama3", _p("qdora", r=16, b=1, s=1024, chunked_loss=True, loss_chunk_tokens=128)),
    Case("small-llama3", _p("full", b=2, s=128, chunked_loss=True, loss_chunk_tokens=64)),
    Case("smollm2", _p("qdora", r=16, b=2, s=256, chunked_loss=True)),
    Case("smollm2", _p("qdora", r=16, b=2, s=256, chunked_loss=True, loss_chunk_tokens=64)),
]
LONG = [  # the long-sequence options (qdora.tiled_mlp, qdora.offload_activations), each on and off, on long rows
    Case("small-llama3", _p("qdora", r=16, b=1, s=4096, chunked_loss=True)),
    Case("small-llama3", _p("qdora", r=16, b=1, s=4096, chunked_loss=True, tiled_mlp=True)),
    Case("small-llama3", _p("qdora", r=16, b=1, s=4096, chunked_loss=True, offload_activations=True)),
    Case("small-llama3", _p("qdora", r=16, b=1, s=4096, chunked_loss=True, tiled_mlp=True,
                            offload_activations=True)),
    Case("small-llama3", _p("qdora", r=16, b=1, s=8192, chunked_loss=True)),
    Case("small-llama3", _p("qdora", r=16, b=1, s=8192, chunked_loss=True, tiled_mlp=True,
                            offload_activations=True)),
    Case("small-llama3", _p("qdora", r=16, b=1, s=8192, chunked_loss=True, tiled_mlp=True, mlp_tile_tokens=1024)),
    Case("smollm2", _p("qdora", r=16, b=1, s=2048, chunked_loss=True)),
    Case("smollm2", _p("qdora", r=16, b=1, s=2048, chunked_loss=True, tiled_mlp=True, offload_activations=True)),
    Case("smollm2", _p("qdora", r=16, b=1, s=4096, chunked_loss=True)),
    Case("smollm2", _p("qdora", r=16, b=1, s=4096, chunked_loss=True, tiled_mlp=True)),
]
_LAYER_PEAK = dict(r=16, b=1, chunked_loss=True, loss_chunk_tokens=256)  # small chunks: the layer backward peaks
TILED = [  # qdora.tiled_layers and the tiled MLP where a layer's backward is the peak; the profiler's events
    Case("small-llama3", _p("qdora", s=4096, **_LAYER_PEAK)),
    Case("small-llama3", _p("qdora", s=4096, tiled_mlp=True, **_LAYER_PEAK)),
    Case("small-llama3", _p("qdora", s=4096, tiled_layers=True, **_LAYER_PEAK)),
    Case("small-llama3", _p("qdora", s=4096, tiled_layers=True, target_modules="all", mlp_tile_tokens=1024,
                            **_LAYER_PEAK)),
    Case("small-llama3", _p("qdora", s=4096, ckpt=False, tiled_layers=True, target_modules="all", **_LAYER_PEAK)),
    Case("small-llama3", _p("qdora", s=8192, tiled_mlp=True, **_LAYER_PEAK)),
    Case("small-llama3", _p("qdora", s=8192, tiled_layers=True, **_LAYER_PEAK)),
    Case("small-llama3", _p("qdora", s=8192, tiled_layers=True, target_modules="all", dropout=0.0, **_LAYER_PEAK)),
    Case("small-llama3", _p("qdora", s=8192, tiled_layers=True, target_modules="all", offload_activations=True,
                            **_LAYER_PEAK)),
    Case("small-llama3", _p("qdora", s=8192, ckpt=False, tiled_layers=True, target_modules="all", **_LAYER_PEAK)),
    Case("smollm2", _p("qdora", r=16, b=1, s=8192, chunked_loss=True, tiled_layers=True)),
    Case("smollm2", _p("qdora", r=16, b=1, s=16384, chunked_loss=True)),
    Case("smollm2", _p("qdora", r=16, b=1, s=16384, chunked_loss=True, tiled_layers=True)),
]
SMOLLM2_32K = [  # the longest rows: memray's heap peak (the profiler's events of one step outgrow 24 GiB)
    Case("smollm2", _p("qdora", r=16, b=1, s=32768, chunked_loss=True)),
    Case("smollm2", _p("qdora", r=16, b=1, s=32768, chunked_loss=True, tiled_layers=True)),
    Case("smollm2", _p("qdora", r=16, b=1, s=32768, chunked_loss=True, tiled_mlp=True, offload_activations=True)),
]
SMOLLM2 = [
    Case("smollm2", _p("qdora", r=16, b=2, s=256)),
    Case("smollm2", _p("qdora", r=16, b=2, s=256, ckpt=False)),
    Case("smollm2", _p("qlora", r=64, b=4, s=128)),
    Case("smollm2", _p("lora", r=16, b=1, s=512, dropout=0.0, ckpt=False)),
    Case("smollm2", _p("full", b=1, s=128)),
]


# Published peak-memory figures and the settings they were measured with. The planner models this
# library's code (transformers 5, torch SDPA); the published runs used their own code of 2023-24.
_AA = "q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"  # fsdp_qlora train.py: lora_target_modules='all'
_AA_KW = dict(r=64, target_modules=_AA, dropout=0.1, adapter_dtype="bfloat16", gpus=2)
PUBLISHED = [
    # (source, what was measured, model, PlanConfig, published GiB or None, how the figure reads)
    ("QLoRA paper (Dettmers et al. 2023, arXiv 2305.14314), abstract; settings: artidoro/qlora "
     "scripts/finetune_guanaco_65b.sh", "Guanaco-65B: r=64 all linears, batch 4 x <=528 tokens, grad. ckpt, "
     "paged AdamW (32-bit), bf16 adapters", "llama-65b",
     PlanConfig(method="qlora", r=64, target_modules="all", dropout=0.05, batch_size=4, seq_len=528,
                adapter_dtype="bfloat16"), 48.0, "fits one 48 GB GPU"),
    ("Answer.AI fsdp_qlora benchmarks_03_2024.md (2x3090)", "Llama-2-7B QLoRA, FSDP 2 GPUs, batch 1 x 512",
     "llama-2-7b", PlanConfig(method="qlora", batch_size=1, seq_len=512, **_AA_KW), 4.98, "peak reserved"),
    ("Answer.AI fsdp_qlora benchmarks_03_2024.md (2x3090)", "Llama-2-7B QLoRA, FSDP 2 GPUs, batch 1 x 2048",
     "llama-2-7b", PlanConfig(method="qlora", batch_size=1, seq_len=2048, **_AA_KW), 5.21, "peak reserved"),
    ("Answer.AI fsdp_qlora benchmarks_03_2024.md (2x3090)", "Llama-2-7B QLoRA, FSDP 2 GPUs, batch 4 x 2048",
     "llama-2-7b", PlanConfig(method="qlora", batch_size=4, seq_len=2048, **_AA_KW), 11.22, "peak reserved"),
    ("Answer.AI fsdp_qlora benchmarks_03_2024.md (2x3090)", "Llama-2-7B QLoRA, FSDP 2 GPUs, batch 10 x 2048",
     "llama-2-7b", PlanConfig(method="qlora", batch_size=10, seq_len=2048, **_AA_KW), 20.97, "peak reserved"),
    ("Answer.AI fsdp_qlora benchmarks_03_2024.md (2x3090)", "Llama-2-7B LoRA, FSDP 2 GPUs, batch 1 x 512",
     "llama-2-7b", PlanConfig(method="lora", batch_size=1, seq_len=512, **_AA_KW), 8.28, "peak allocated"),
    ("Answer.AI fsdp_qlora benchmarks_03_2024.md (2x3090)", "Llama-2-7B LoRA, FSDP 2 GPUs, batch 1 x 2048",
     "llama-2-7b", PlanConfig(method="lora", batch_size=1, seq_len=2048, **_AA_KW), 9.16, "peak allocated"),
    ("Answer.AI fsdp_qlora benchmarks_03_2024.md (2x3090)", "Llama-2-7B LoRA, FSDP 2 GPUs, batch 4 x 2048",
     "llama-2-7b", PlanConfig(method="lora", batch_size=4, seq_len=2048, **_AA_KW), 16.14, "peak reserved"),
    ("Answer.AI fsdp_qlora benchmarks_03_2024.md (2x3090)", "Llama-2-70B QLoRA, FSDP 2 GPUs + CPU offload, "
     "batch 2 x 2048", "llama-2-70b", PlanConfig(method="qlora", batch_size=2, seq_len=2048, cpu_offload=True,
                                               **_AA_KW), 14.92, "peak reserved"),
]


def published_table() -> str:
    """The planner's prediction beside each published figure (allocated = tensors; reserved =
    tensors + allocator slack; the CUDA context is outside both)."""
    out = ["| source | setting | published | planner: tensors | + allocator slack | + CUDA context |",
           "|---|---|---|---:|---:|---:|"]
    for source, setting, model, cfg, figure, reads in PUBLISHED:
        p = plan(model, cfg)
        pub = f"{reads}: {figure:.2f} GiB" if reads.startswith("peak") else reads
        out.append(f"| {source} | {setting} | {pub} | {p.tensor_bytes / GIB:.2f} | "
                   f"{(p.tensor_bytes + p.terms['allocator_slack']) / GIB:.2f} | {p.total_bytes / GIB:.2f} |")
    return "\n".join(out)


# Long sequences on one card (`--goal`): Llama-3-8B, r=32 on every linear, batch 1, against the anchor's published
# QLoRA figures (Unsloth's "Unsloth Benchmarks" page: Llama-3.1-8B, 4-bit QLoRA on all linears, r=32, batch 1).
GOAL = {8: 4096, 12: None, 16: 65536, 24: 131072, 40: None, 48: None, 80: None}
"""The tokens this library aims at per card size (GB); None: no target."""
ANCHOR = {8: 2972, 12: 21848, 16: 40724, 24: 78475, 80: 342733}
"""The anchor's published longest sequence per card (GB)."""


def goal_settings() -> list[tuple[str, PlanConfig]]:
    """`(label, setting)` rows of the goal table: QDoRA and QLoRA, the default loss only, then every option;
    dropout 0.05 (`qdora train`'s default) and 0 (the anchor's); AdamW and 8-bit paged AdamW."""
    rows = []
    for method in ("qdora", "qlora"):
        for options, label in ((dict(chunked_loss=True), "chunked loss"),
                               (dict(chunked_loss=True, offload_activations=True, tiled_mlp=True),
                                "chunked loss + offload + tiled MLP"),
                               (dict(chunked_loss=True, offload_activations=True, tiled_layers=True),
                                "chunked loss + offload + tiled layers"),
                               (dict(chunked_loss=True, offload_activations=True, tiled_layers=True,
                                     mlp_tile_tokens=1024),
                                "chunked loss + offload + tiled layers (1,024-token tiles)")):
            for dropout in (0.05, 0.0):
                for optimizer in ("adamw", "paged_adamw_8bit"):
                    cfg = PlanConfig(method=method, r=32, target_modules="all", dropout=dropout, batch_size=1,
                                     optimizer=optimizer, **options)
                    rows.append((f"{method}, {label}, dropout {dropout}, {optimizer}", cfg))
    return rows


def goal_table() -> str:
    """The longest sequence per card (within the card: the anchor publishes measured maxima) for each goal
    setting, then, for each target out of reach, the plan at the target: by how much it misses, and its terms."""
    shape = resolve_model("llama-3-8b")
    cards = [gb for gb in MAX_SEQ_CARDS_GB if gb in ANCHOR or GOAL.get(gb)]
    out = ["| setting | " + " | ".join(f"{gb} GB" for gb in cards) + " |", "|---|" + "---:|" * len(cards),
           "| anchor (published QLoRA) | " + " | ".join(f"{ANCHOR[gb]:,}" if gb in ANCHOR else "-" for gb in cards)
           + " |", "| target (qdora) | " + " | ".join(f"{GOAL[gb]:,}" if GOAL.get(gb) else "-" for gb in cards) + " |"]
    misses = []
    for label, cfg in goal_settings():
        got = {gb: longest_sequence(shape, cfg, gb, margin=False) for gb in cards}
        out.append(f"| {label} | " + " | ".join(f"{got[gb]:,}" for gb in cards) + " |")
        if cfg.method == "qdora" and cfg.tiled_layers:
            for gb in cards:
                if GOAL.get(gb) and got[gb] < GOAL[gb]:
                    p = plan(shape, at_length(cfg, GOAL[gb]))
                    terms = ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(p.terms.items(), key=lambda kv: -kv[1])
                                      if v)
                    misses.append(f"- {label}, {gb} GB at {GOAL[gb]:,} tokens: {p.total_bytes / GIB:.2f} GiB, "
                                  f"{(p.total_bytes - gb * GIB) / GIB:+.2f} GiB over the card (peak at the "
                                  f"{p.peak_phase}; GiB: {terms})")
    return "\n".join(out + ([""] + misses if misses else []))


def build_model(case: Case):
    """The model `qdora train` would train for this case, on CPU. Returns (model, shape)."""
    cfg = case.cfg
    adapter_cfg = AdapterConfig(method=cfg.method, r=cfg.r if cfg.method != "full" else 16,
                                alpha=2.0 * cfg.r, dropout=cfg.dropout,
                                target_modules=tuple(cfg.target_modules),
                                magnitude_only_modules=tuple(cfg.magnitude_only_modules), norm=cfg.norm,
                                adapter_dtype=cfg.adapter_dtype, double_quant=cfg.double_quant,
                                block_rows=cfg.block_rows)
    if case.model == "smollm2":
        model, _ = load_model(smollm2_gguf_path(), method=cfg.method, cfg=adapter_cfg, progress=False)
        shape = shape_from_config(model.config, name="SmolLM2-135M")
    else:
        import transformers  # heavy, used here only

        if case.model in ARCH_SHAPES:
            config_class, model_class, kw = ARCH_SHAPES[case.model]
        else:
            arch, kw = MOE_SHAPES[case.model] if case.model in MOE_SHAPES else ("Llama", SHAPES[case.model])
            config_class, model_class = f"{arch}Config", f"{arch}ForCausalLM"
        config = getattr(transformers, config_class)(**kw, max_position_embeddings=4096)
        torch.manual_seed(0)
        model = getattr(transformers, model_class)(config)
        qdora.add_adapters(model, adapter_cfg, verbose=False)
        shape = shape_from_config(config, name=case.model)
    prepare_for_training(model, cfg.gradient_checkpointing)   # exactly as qdora.train.loop does
    training_attention(model, packing=False)  # a sliding window's blocks, as qdora.train.setup switches them on
    if cfg.chunked_loss:  # as qdora.train.setup installs it
        qdora.chunked_loss(model, cfg.loss_chunk_tokens or None)
    long_sequence_options(model, cfg)
    return model, shape


MEASURES = {"timeline": peak_bytes, "events": step_peak_bytes, "heap": heap_peak_bytes}
"""How a step's peak is measured (`qdora.eval.bench.memory`): the profiler's memory timeline (exact, hours at
16K tokens), its allocation events alone (minutes there, but a 32K-token step's events outgrow 24 GiB), or
memray's heap high-water mark (the step's own time; tensors and the little heap beside them)."""


def measure(case: Case, seed: int = 0, how: str = "timeline") -> dict:
    """Measured peak bytes of a steady-state training step, and its parts. `how`: a key of `MEASURES`; all but
    the timeline warm up with a 64-token step (the optimizer states do not depend on the sequence)."""
    if how not in MEASURES:
        raise ValueError(f"how={how!r}: use one of {', '.join(MEASURES)}")
    # a window's shared band mask is made by the first step long enough to need it and kept for the run: each case
    # makes its own, as a run of its own would (a mask cached by an earlier case would be counted nowhere)
    band_mask.cache_clear()
    model, shape = build_model(case)
    cfg = case.cfg
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab, (cfg.batch_size, cfg.seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(batch=batch):  # qdora.train.loop's step: loss, backward, clip, optimizer step, zero_grad
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step({k: v[:, :64] for k, v in batch.items()} if how != "timeline" else batch)  # the optimizer states exist
    weights = tensor_bytes(model)
    states = sum(t.untyped_storage().nbytes() for st in optimizer.state.values() for t in st.values()
                 if torch.is_tensor(t) and t.dim() > 0)
    step_peak = MEASURES[how](step)
    predicted = plan(shape, cfg)
    return {"model": shape.name, "method": cfg.method, "r": cfg.r, "targets": list(cfg.target_modules),
            "dropout": cfg.dropout, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
            "gradient_checkpointing": cfg.gradient_checkpointing, "measure": how, "weights_bytes": weights,
            "optimizer_bytes": states, "step_peak_bytes": step_peak, "measured_bytes": weights + states + step_peak,
            "predicted_bytes": predicted.tensor_bytes, "predicted_phase": predicted.peak_phase,
            **({"loss_chunk_tokens": chunk_tokens(shape, cfg)} if cfg.chunked_loss else {}),
            **({"options": options(shape, cfg)} if cfg.tiled_mlp or cfg.tiled_layers or cfg.offload_activations
               else {})}


def options(shape, cfg: PlanConfig) -> str:
    """The long-sequence options of a case, as the table shows them."""
    tile = (f"tiled layers ({cfg.mlp_tile_tokens or shape.hidden})" if cfg.tiled_layers else
            f"tiled MLP ({cfg.mlp_tile_tokens or shape.hidden})" if cfg.tiled_mlp else "")
    return " + ".join(o for o in (tile, "offload" if cfg.offload_activations else "") if o)


def chunk_tokens(shape, cfg: PlanConfig) -> int:
    """Tokens per chunk of the chunked loss in this case (`qdora.core.loss.default_chunk_tokens`, or
    the one set), capped at the rows the batch predicts."""
    return min(cfg.batch_size * (cfg.seq_len - 1), cfg.loss_chunk_tokens or default_chunk_tokens(shape.vocab))


def error(row: dict) -> float:
    return row["predicted_bytes"] / row["measured_bytes"] - 1.0


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table; with a `loss chunk` column (tokens per chunk) where a row used the
    chunked loss."""
    chunked = any("loss_chunk_tokens" in r for r in rows)
    long = any("options" in r for r in rows)
    out = ["| model | method | r | targets | dropout | batch × seq | ckpt | " + ("loss chunk | " if chunked else "")
           + ("options | " if long else "") + "predicted MiB | measured MiB | error |",
           "|---|---|---|---|---|---|---|" + ("---:|" if chunked else "") + ("---|" if long else "")
           + "---:|---:|---:|"]
    for r in rows:
        targets = "all" if r["targets"] == ["all-linear"] else "qkv,up,down" if r["targets"] == [
            "q_proj", "k_proj", "v_proj", "up_proj", "down_proj"] else ",".join(r["targets"]).replace(
            "experts.gate_up_proj,experts.down_proj", "experts")
        out.append(f"| {r['model']} | {r['method']} | {r['r'] if r['method'] != 'full' else '-'} | "
                   f"{targets if r['method'] != 'full' else '-'} | {r['dropout'] if r['method'] != 'full' else '-'} | "
                   f"{r['batch_size']} × {r['seq_len']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                   + (f"{r.get('loss_chunk_tokens', '-')} | " if chunked else "")
                   + (f"{r.get('options', '-')} | " if long else "") +
                   f"{r['predicted_bytes'] / 2**20:.2f} | {r['measured_bytes'] / 2**20:.2f} | "
                   f"{100 * error(r):+.1f}% |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qdora.eval.plan.validate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes only (seconds)")
    p.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2-135M")
    p.add_argument("--only", choices=("quick", "small", "smollm2", "moe", "gemma", "chunked", "long", "tiled",
                                         "smollm2-32k"),
                   help="run one group of cases (chunked: the chunked loss, qdora.chunked_loss)")
    p.add_argument("--measure", choices=tuple(MEASURES),
                   help="how a step's peak is measured (default: events for tiled and gemma, heap for smollm2-32k, "
                        "else the timeline)")
    p.add_argument("--case", type=int, action="append",
                   help="run only this case of the group (its index, from 0; repeatable)")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--tile-mib", type=int, help="the soft-capped attention's tiles (Gemma 2), MiB of fp32 scores a "
                   "tile, for plan and run alike (default: 4 on CPU): larger ones put a tile's working set at the "
                   "step's peak")
    p.add_argument("--published", action="store_true",
                   help="print the planner beside published figures (no measurement) and stop")
    p.add_argument("--start", action="store_true", help="validate the FSDP start term (2 processes per case)")
    p.add_argument("--goal", action="store_true",
                   help="print the longest sequence per card for Llama-3-8B r=32 on every linear, batch 1, beside the "
                        "anchor's published QLoRA figures and qdora's targets (no measurement), and stop")
    p.add_argument("--start-worker", nargs=4, metavar=("FOLDER", "METHOD", "R", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.start_worker:
        folder, method, r, out = args.start_worker
        start_worker(folder, method, int(r), out)
        return 0
    if args.start:
        rows = []
        with tempfile.TemporaryDirectory() as workdir:
            for name, method, r in START_CASES:
                rows.append(measure_start(name, method, r, workdir))
                print(start_table(rows[-1:]).splitlines()[-1], flush=True)
        print(start_table(rows))
        print(f"\nworst |error|: {100 * max(abs(error(r)) for r in rows):.1f}% over {len(rows)} cases")
        return 0
    if args.published:
        print(published_table())
        return 0
    if args.goal:
        print(goal_table())
        return 0

    if args.tile_mib is not None:
        if args.tile_mib < 1:
            p.error(f"--tile-mib={args.tile_mib} must be >= 1 (MiB of fp32 scores a tile)")
        SOFTCAP_TILE_BYTES["cpu"] = args.tile_mib << 20
    cases = QUICK + ([] if args.quick else SMALL + ([] if args.no_smollm2 else SMOLLM2))
    if args.only:
        cases = {"quick": QUICK, "small": SMALL, "smollm2": SMOLLM2, "moe": MOE + MOE_SHARED, "gemma": GEMMA,
                 "chunked": CHUNKED, "long": LONG, "tiled": TILED, "smollm2-32k": SMOLLM2_32K}[args.only]
    if args.case:
        bad = [i for i in args.case if not 0 <= i < len(cases)]
        if bad:
            p.error(f"--case {bad[0]}: the group has cases 0 to {len(cases) - 1}")
        cases = [cases[i] for i in args.case]
    how = args.measure or {"tiled": "events", "gemma": "events", "smollm2-32k": "heap"}.get(args.only, "timeline")
    rows = []
    for case in tqdm(cases, desc="plan vs measured", unit="case"):
        rows.append(measure(case, how=how))
        tqdm.write(table(rows[-1:]).splitlines()[-1])
        if args.json:  # after every row: a long run stopped part-way keeps what it measured
            write_text_atomic(args.json, json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    worst = max(abs(error(r)) for r in rows)
    print(f"\nworst |error|: {100 * worst:.1f}% over {len(rows)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
