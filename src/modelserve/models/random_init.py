"""Small models with seeded random weights and locally trained tokenizers.

The demo model, the tests and the benchmark all need real Hugging Face model
directories without a model hub. This builds them: a byte-level BPE tokenizer
trained on a short built-in text (so any Unicode round-trips), and a GPT-2,
Llama or Qwen2 shaped model from a config with seeded random weights, saved
with save_pretrained so the ordinary loader reads them like any user's model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"

# A little of several scripts, so the trained merges are not English-only.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. modelserve streams tokens as they are generated.",
    "Hello, world! Serving language models over gRPC, one token at a time, to many callers at once.",
    "In the beginning the server was loading; then it was ready, and it answered every request.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828; symbols: () [] {} <> + - * / = _ # @ & %",
    "日本語のテキストも正しく扱います。中文文本也可以。한국어도 됩니다。",
    "Emoji travel too: 🙂 🚀 🎉 👍🏽 ❤️ and accents: café, naïve, Zürich, señor, São Paulo.",
    "def generate(prompt: str) -> str:\n    return model(prompt)\n",
]


def build_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) trained here, deterministically."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def _config(arch: str, vocab_size: int, eos_id: int, size: dict[str, int]) -> Any:
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    hidden, layers, heads = size["hidden"], size["layers"], size["heads"]
    max_len = size.get("max_len", 2048)
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_len,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
        )
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_len,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(f"unknown architecture {arch!r}: expected gpt2, llama or qwen2")


def build_random_model(
    out_dir: Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_len: int = 2048,
    vocab_size: int | None = None,
    tokenizer_vocab: int = 1024,
) -> Path:
    """Write a model directory (config, safetensors weights, tokenizer) and return it.

    `vocab_size` may exceed the tokenizer's (as in GPT-2-small's 50,257 rows); by
    default the model has exactly the tokenizer's vocabulary.
    """
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tok = build_tokenizer(tokenizer_vocab)
    eos_id = tok.token_to_id(EOS_TOKEN)
    assert eos_id is not None, "the trained tokenizer lost its EOS token"
    config = _config(
        arch,
        vocab_size or tok.get_vocab_size(),
        eos_id,
        dict(hidden=hidden, layers=layers, heads=heads, max_len=max_len),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # A wider init than the default makes random models less flat, so greedy ties are rare.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "norm" not in name:
                param.normal_(0.0, 0.08)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        model_max_length=max_len,
    )
    fast.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    return out_dir
