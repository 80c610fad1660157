"""The one table of what the server knows and does not serve (server/core/unserved.py), as the faces read it."""

from __future__ import annotations

import logging

import pytest

from modelserve.server.core.unserved import MAX_UNKNOWN_LOGGED, OPENAI_SERVED, UNSERVED, UnknownFields, openai_refusal


@pytest.mark.parametrize(
    "body",
    [
        {"n": 3, "temperature": 0.5},
        {"best_of": 1, "functions": [], "function_call": "none"},
        {"response_format": {"type": "text"}, "add_generation_prompt": True, "skip_special_tokens": True},
        {"modalities": ["text"], "chat_template_kwargs": {}, "logits_processors": None},
        {"guided_decoding_backend": "xgrammar"},  # says how a constraint would apply; alone it asks nothing
    ],
)
def test_neutral_values_ask_for_nothing(body: dict[str, object]) -> None:
    assert openai_refusal(body) is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs"),
        ({"continue_final_message": True}, "continue_final_message"),
        ({"skip_special_tokens": False}, "skip_special_tokens"),
        ({"bad_words": ["x"]}, "bad_words"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_fields_that_would_change_the_output_are_refused_by_name(body: dict[str, object], field: str) -> None:
    refusal = openai_refusal(body)
    assert refusal is not None and refusal[0] == field and "is not supported: this server" in refusal[1]


def test_no_field_is_both_served_and_refused() -> None:
    assert not {name for entry in UNSERVED for name in entry.openai} & OPENAI_SERVED


def test_unknown_fields_are_logged_once_each_and_only_so_many(caplog: pytest.LogCaptureFixture) -> None:
    unknown = UnknownFields()
    with caplog.at_level(logging.WARNING, logger="modelserve.server.core.unserved"):
        unknown.note({"frobnicate": 1, "temperature": 1.0})
        unknown.note({"frobnicate": 2})
        assert [r.getMessage() for r in caplog.records] == [
            "ignoring the request field 'frobnicate', which this server does not know (logged once)"
        ]
        for i in range(3 * MAX_UNKNOWN_LOGGED):
            unknown.note({f"field_{i}": i})
    assert len(caplog.records) == MAX_UNKNOWN_LOGGED + 1  # and a last line saying no more are logged
