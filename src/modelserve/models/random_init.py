"""Small models with seeded random weights and locally built tokenizers.

The demo model, the tests and the benchmark all need real Hugging Face model
directories without a model hub. This builds them: a byte-level BPE tokenizer
trained on a short built-in text (so any Unicode round-trips: what the tests
need), and a GPT-2, Llama or Qwen2 shaped model from a config with seeded random
weights, saved with save_pretrained so the ordinary loader reads them like any
user's model.

Random weights pick random tokens, and a byte-level token is often a part of a
UTF-8 character, so such a model's text is mostly U+FFFD. The demo model, which
people read, takes a word tokenizer instead (`build_word_tokenizer`): every
piece is a whole word or one whole character, so any token sequence decodes to
readable text.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
_SPACE = "\u2581"  # "▁": sentencepiece's visible space, the start of a word
# Single characters a word tokenizer spells unknown words with; anything else is UNK_TOKEN.
_WORD_ALPHABET = string.ascii_letters + string.digits + string.punctuation

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


def build_tokenizer(vocab_size: int = 1024, corpus: Iterable[str] | None = None) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) trained here, deterministically, on `corpus` (a small built-in
    text by default, which gives a few hundred pieces whatever `vocab_size` asks)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4 if corpus is None else corpus, trainer=trainer)
    return tok


def build_word_tokenizer(words: Iterable[str]) -> Tokenizer:
    """A tokenizer whose pieces are whole words and single characters, never parts of one.

    A Unigram model over a fixed vocabulary (nothing is learned, so it is the same on
    every machine): each of `words` is one piece "▁word" (a space, then the word);
    ASCII letters, digits and punctuation are pieces of their own, so any ASCII text
    is spelled out; every other character (newlines and tabs too) encodes as
    UNK_TOKEN. Text is split at spaces and a Metaspace decoder turns "▁" back into
    spaces, so a random sequence of pieces reads as words separated by spaces.
    """
    vocab: list[tuple[str, float]] = [(UNK_TOKEN, 0.0), (EOS_TOKEN, 0.0), (_SPACE, -8.0)]
    # A whole word (one piece, -5) always beats spelling it (at least two pieces, -10 each).
    vocab += [(_SPACE + word, -5.0) for word in sorted(set(words)) if word and not any(c.isspace() for c in word)]
    vocab += [(char, -10.0) for char in _WORD_ALPHABET]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="always", split=True)
    tok.add_special_tokens([UNK_TOKEN, EOS_TOKEN])
    return tok


def _config(arch: str, vocab_size: int, eos_id: int, size: dict[str, int], overrides: dict[str, Any]) -> Any:
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
            **overrides,
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
        return LlamaConfig(**common, **overrides)
    if arch == "qwen2":
        return Qwen2Config(**{**common, "use_sliding_window": False, **overrides})
    from transformers import AutoConfig

    try:  # any other transformers model type, sized by the common names (most configs map them)
        return AutoConfig.for_model(arch, **common, **overrides)
    except ValueError as exc:
        raise ValueError(f"unknown model type {arch!r}: {exc}") from exc


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
    tokenizer: Tokenizer | None = None,
    chat_template: str | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a model directory (config, safetensors weights, tokenizer) and return it.

    The tokenizer is `tokenizer` when given (it must hold EOS_TOKEN), else a
    byte-level BPE of `tokenizer_vocab` pieces from `build_tokenizer`.
    `vocab_size` may exceed the tokenizer's (as in GPT-2-small's 50,257 rows); by
    default the model has exactly the tokenizer's vocabulary. `arch` is gpt2, llama,
    qwen2 or any other transformers model type, whose config takes `config_overrides`. A `chat_template`
    is saved with the tokenizer, where a model's own chat template lives.
    """
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tok = tokenizer if tokenizer is not None else build_tokenizer(tokenizer_vocab)
    eos_id = tok.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise ValueError(f"the tokenizer has no {EOS_TOKEN} token")
    config = _config(
        arch,
        vocab_size or tok.get_vocab_size(),
        eos_id,
        dict(hidden=hidden, layers=layers, heads=heads, max_len=max_len),
        config_overrides or {},
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
    specials: dict[str, str] = {"eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN}
    if tok.token_to_id(UNK_TOKEN) is not None:
        specials["unk_token"] = UNK_TOKEN
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=max_len, chat_template=chat_template, **specials
    )
    fast.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    return out_dir
