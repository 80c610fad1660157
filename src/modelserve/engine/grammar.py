"""Structured output: a request's constraint (JSON schema, any JSON object, regular expression, a choice
among strings, a grammar) as a grammar, and the per-row matchers that turn it into a token mask each step.

Built on llguidance (PyPI, the engine behind vLLM's `guidance` backend), chosen over xgrammar here: both
run on a CPU, but xgrammar's wheel pulls in triton (hundreds of MB) on x86-64 and compiles each grammar
ahead against the whole vocabulary, while llguidance is one 3 MB wheel with no dependencies whose
matcher computes a mask lazily (about 10 microseconds a token for a JSON schema on a 50k vocabulary,
measured here) and needs no compile step worth caching beyond the matcher itself.

Two halves, one per process:

- The frontend turns the caller's constraint into an llguidance grammar (a string) and checks it
  (`grammar_for`): an invalid schema, regex or grammar is refused before the request is admitted.
  JSON is compact (no free whitespace), so a model cannot pad its output with spaces forever.
- The engine core (`Grammars`) builds one matcher per grammar on a thread (llguidance releases the GIL),
  never on the step loop, caches it, and gives each row a copy; a request waits in the queue until its
  grammar is ready while the running rows go on. Each step the sampler asks every constrained row's
  matcher for its mask (`masks`) and the row's matcher takes each token it samples; a row whose
  grammar is complete may only end (EOS), and one cut short by its length limit ends as `length`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
_COMPACT_JSON = {"whitespace_flexible": False}
MAX_CACHED_GRAMMARS = 64


class GrammarError(ValueError):
    """The caller's constraint is not a valid schema, regex or grammar (the message says why)."""


def grammar_for(kind: str, value: str | list[str] | bool) -> str:
    """An llguidance grammar for one constraint, checked; GrammarError when it is not valid."""
    if kind == "json_schema":
        assert isinstance(value, str)
        try:
            schema = json.loads(value)
        except ValueError as exc:
            raise GrammarError(f"is not valid JSON: {exc}") from None
        if not isinstance(schema, dict | bool):
            raise GrammarError("must be a JSON object (a JSON schema)")
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_COMPACT_JSON)  # type: ignore[arg-type]
    elif kind == "json_object":
        grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_COMPACT_JSON)  # type: ignore[arg-type]
    elif kind == "regex":
        assert isinstance(value, str)
        grammar = llguidance.LLMatcher.grammar_from_regex(value)
    elif kind == "choice":
        assert isinstance(value, list)
        if not value:
            raise GrammarError("must list at least one string")
        grammar = llguidance.LLMatcher.grammar_from_lark(_choice_lark(value))
    elif kind == "grammar":
        assert isinstance(value, str)
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(any_to_lark(value))
        except Exception as exc:  # the EBNF converter's own parse errors
            raise GrammarError(f"is not a valid EBNF (GBNF) or Lark grammar: {exc}") from None
    else:
        raise GrammarError(f"unknown constraint kind {kind!r}; one of {', '.join(KINDS)}")
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise GrammarError(f"is not valid: {' '.join(problem.split())[:300]}")
    return grammar


def _choice_lark(choices: list[str]) -> str:
    """Exactly one of `choices`, as written (each a quoted Lark literal)."""
    return "start: " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices) + "\n"


class Grammars:
    """The engine core's matchers: built off the step loop, cached by grammar, one copy per row."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._source = tokenizer
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modelserve-grammar")
        self._built: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._building: dict[str, Future[llguidance.LLMatcher]] = {}

    def ready(self, grammar: str) -> bool:
        """Is `grammar`'s matcher built? If not, its build starts (once). GrammarError if it failed."""
        if grammar in self._built:
            return True
        future = self._building.get(grammar)
        if future is None:
            self._building[grammar] = self._pool.submit(self._build, grammar)
            return False
        if not future.done():
            return False
        del self._building[grammar]
        try:
            template = future.result()
        except Exception as exc:
            raise GrammarError(f"its matcher could not be built: {type(exc).__name__}: {exc}") from exc
        if template.is_error():
            raise GrammarError(f"its matcher could not be built: {template.get_error()}")
        self._built[grammar] = template
        while len(self._built) > MAX_CACHED_GRAMMARS:
            self._built.popitem(last=False)
        return True

    def wait(self, timeout_s: float) -> None:
        """Block until a build finishes (or `timeout_s`): for a core with nothing else to do."""
        futures = list(self._building.values())
        if futures:
            wait(futures, timeout=timeout_s, return_when=FIRST_COMPLETED)

    @property
    def building(self) -> bool:
        return bool(self._building)

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher for a row (its grammar was ready when the row was admitted)."""
        self._built.move_to_end(grammar)
        return self._built[grammar].deep_copy()

    def _build(self, grammar: str) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:  # built once (about 50 ms for a 50k vocabulary), at the first constraint
            if self._tokenizer is None:
                if self._source is None:
                    raise RuntimeError("this engine was built without a tokenizer: it cannot constrain output")
                from tokenizers import Tokenizer

                copy = Tokenizer.from_str(self._source.to_str())
                copy.no_padding()
                copy.no_truncation()
                try:  # llguidance reads the tokenizer's own JSON: byte-level BPE and SentencePiece-style decoders
                    self._tokenizer = llguidance.LLTokenizer(
                        copy.to_str(), n_vocab=self._vocab_size, eos_token=self._eos
                    )
                except ValueError as exc:  # a decoder it does not know (a bare Metaspace, say): each token's text
                    log.info("structured output reads each token's text from the tokenizer (%s)", exc)
                    table = llguidance.TokenizerWrapper(_TokenTable(copy, self._vocab_size, self._eos))
                    self._tokenizer = llguidance.LLTokenizer(table, n_vocab=self._vocab_size, eos_token=self._eos)
            return self._tokenizer


class _TokenTable:
    """A tokenizer as llguidance's TokenizerWrapper takes it: every token's bytes as the token adds them to a
    text (decoded after an anchor token, so a leading space a decoder strips at the start is kept)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos: list[int]) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = eos[0] if eos else 0
        self.bos_token_id = None
        special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
        self.special_token_ids = sorted(special)
        anchor = tokenizer.encode("a", add_special_tokens=False).ids[:1] or [0]
        start = tokenizer.decode(anchor, skip_special_tokens=False)
        self.tokens = [
            b""
            if i in special or i >= tokenizer.get_vocab_size()
            else tokenizer.decode([*anchor, i], skip_special_tokens=False).removeprefix(start).encode()
            for i in range(vocab_size)
        ]

    def __call__(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)


def fill_masks(matchers: list[llguidance.LLMatcher], bitmask: torch.Tensor) -> None:
    """Each matcher's allowed tokens into its row of `bitmask` ([rows, words] int32 on the CPU, bit t of
    word w allowing token 32 w + t)."""
    width = bitmask.shape[1] * 4
    for i, matcher in enumerate(matchers):
        matcher.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), width)
