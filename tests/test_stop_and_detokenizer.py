"""Stop sequences across chunk boundaries, and UTF-8 safe incremental detokenization."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelserve.engine.detokenizer import IncrementalDetokenizer
from modelserve.engine.stop import StopSequenceMatcher
from modelserve.models.random_init import build_tokenizer

TOKENIZER = build_tokenizer(1024)


def _stream(matcher: StopSequenceMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    out = []
    for piece in pieces:
        match = matcher.push(piece)
        out.append(match.text)
        if match.stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_split_across_pieces_never_leaks() -> None:
    out, stopped = _stream(StopSequenceMatcher(("STOP",)), ["abc S", "T", "O", "P tail"])
    assert stopped
    assert "".join(out) == "abc "
    assert out == ["abc ", "", "", ""]  # "S", "T", "O" were held back, never sent


def test_held_text_is_released_when_it_cannot_match() -> None:
    out, stopped = _stream(StopSequenceMatcher(("STOP",)), ["abc ST", "ONE"])
    assert not stopped
    assert out == ["abc ", "STONE", ""]


def test_include_stop_sequence_and_earliest_match_wins() -> None:
    out, stopped = _stream(StopSequenceMatcher(("world", "lo w"), include_stop=True), ["hello world"])
    assert stopped and "".join(out) == "hello w"


def test_unflushed_tail_comes_out_at_the_end() -> None:
    out, stopped = _stream(StopSequenceMatcher(("</s>",)), ["answer <", "/"])
    assert not stopped and "".join(out) == "answer </"


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60), stop=st.text(min_size=1, max_size=5), cuts=st.lists(st.integers(0, 60)))
def test_stop_matching_equals_find_on_the_whole_text(text: str, stop: str, cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    out, stopped = _stream(StopSequenceMatcher((stop,)), pieces)
    at = text.find(stop)
    assert stopped == (at != -1)
    assert "".join(out) == (text[:at] if at != -1 else text)


def _detok_deltas(ids: list[int], prompt: list[int] | None = None) -> list[str]:
    detok = IncrementalDetokenizer(TOKENIZER, prompt or [])
    deltas = [detok.step(t) for t in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize(
    "text", ["日本語のテキスト、中文文本", "emoji 🙂🚀🎉 👍🏽 ❤️ done", "naïve café Zürich", "  two  spaces  "]
)
def test_multibyte_text_round_trips_without_broken_characters(text: str) -> None:
    ids = TOKENIZER.encode(text, add_special_tokens=False).ids
    # Byte-level BPE splits these characters over several tokens: the test means something.
    assert len(ids) > len(text.split())
    deltas = _detok_deltas(ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=40), prompt=st.text(max_size=10))
def test_joined_deltas_equal_decode_of_the_output(text: str, prompt: str) -> None:
    ids = TOKENIZER.encode(text, add_special_tokens=False).ids
    prompt_ids = TOKENIZER.encode(prompt, add_special_tokens=False).ids
    assert "".join(_detok_deltas(ids, prompt_ids)) == TOKENIZER.decode(ids)


def test_invalid_bytes_are_released_at_the_end() -> None:
    # A lone continuation byte never becomes a character; flush still gives what decode() gives.
    ids = TOKENIZER.encode("日", add_special_tokens=False).ids
    assert len(ids) > 1
    broken = ids[1:]  # drop the lead byte
    deltas = _detok_deltas(broken)
    assert "".join(deltas) == TOKENIZER.decode(broken) != ""
