"""Tiny random Llama models shaped like Llama-2 and Llama-3, scaled down, built in the tests."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qdora import QDoRALinear


def llama2_config(**kw):
    # Llama-2: multi-head attention (no GQA), rope theta 1e4, 32k vocab (scaled to 256).
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0,
                max_position_embeddings=128, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def llama3_config(**kw):
    # Llama-3: GQA (8 heads, 2 kv heads), rope theta 5e5, large vocab (128256 scaled to 1024).
    base = dict(vocab_size=1024, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                max_position_embeddings=128, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def build(config, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_tokenizer(path, vocab_size):
    """A real (tiny) fast tokenizer saved next to a checkpoint: word-level over a fixed vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.save_pretrained(path)
    return fast


def _byte_level_bpe(corpus, vocab_size, special_tokens):
    """A byte-level BPE tokenizer (as Llama 3's and SmolLM2's) trained offline on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer)
    return tok


def save_bpe_tokenizer(path, corpus, vocab_size=400):
    """A real byte-level BPE tokenizer trained offline on `corpus`, adding BOS like Llama's."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _byte_level_bpe(corpus, vocab_size, ["<pad>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
"""ChatML, the chat template of SmolLM2 and Qwen (without their default system prompts)."""


def chatml_tokenizer(corpus, vocab_size=500):
    """A real byte-level BPE tokenizer trained offline on `corpus`, with ChatML's special tokens
    (`<|im_end|>` is its EOS) and template."""
    from transformers import PreTrainedTokenizerFast

    tok = _byte_level_bpe(corpus, vocab_size, ["<pad>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def perturb(model, seed=5):
    """Make every adapter matter (B and the magnitude away from their step-0 values)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, QDoRALinear):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.2)
                if layer.use_dora:
                    layer.magnitude_delta.copy_(torch.randn(layer.magnitude_delta.shape, generator=gen) * 0.05)
    return model
