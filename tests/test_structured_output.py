"""Structured output in the engine: every output of a constrained request matches its constraint, on a
random-weight model that would never write JSON by itself; an invalid constraint is refused before it
reaches the engine; a grammar still being built holds back its own request only."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import openai
import pytest
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
from openai import OpenAI
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc

from modelserve.engine.grammar import GrammarError, grammar_for
from modelserve.engine.request import FinishReason, Request, SamplingParams
from tests.conftest import ServerProcess
from tests.test_engine import _collect, _greedy, _load, _running

# A nested object with enums, arrays and required fields. Strings and arrays are bounded: a random model
# never chooses to close a string, so an unbounded one would run to the length limit.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"type": "string", "enum": ["cat", "dog", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "vip": {"type": "boolean"}},
            "required": ["id", "vip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "age", "tags", "owner"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{1,5}-[0-9]{2,4}"
CHOICES = ["yes", "no", "maybe not"]


def _constrained(i: int, prompt: list[int], grammar: str, temperature: float = 1.0) -> Request:
    params = SamplingParams(max_new_tokens=120, temperature=temperature, seed=i, grammar=grammar)
    return Request(f"c{i}", tuple(prompt), params)


async def test_every_output_matches_its_constraint(model_dirs: dict[str, Path]) -> None:
    model = _load(model_dirs["llama"])
    prompt = model.encode("Give me a record:")
    schema, regex = grammar_for("json_schema", json.dumps(SCHEMA)), grammar_for("regex", REGEX)
    choice = grammar_for("choice", CHOICES)
    async with _running(model, 8) as engine:
        plain = engine.submit(_greedy(99, prompt, 40))  # an unconstrained stream beside them
        streams = [engine.submit(_constrained(i, prompt, schema, 1.0 if i % 4 else 0.0)) for i in range(12)]
        streams += [engine.submit(_constrained(100 + i, prompt, regex)) for i in range(6)]
        streams += [engine.submit(_constrained(200 + i, prompt, choice)) for i in range(6)]
        results = await asyncio.gather(*(_collect(s) for s in streams), _collect(plain))
        assert engine.core.blocks.used_blocks == 0 and len(engine.core.runner.states) == 0
    for i, (_, text, last) in enumerate(results[:12]):
        assert last.finish is not None and last.finish.reason is FinishReason.EOS_TOKEN, (i, text)
        jsonschema.validate(json.loads(text), SCHEMA)
    for _, text, _ in results[12:18]:
        assert re.fullmatch(REGEX, text), text
    for _, text, _ in results[18:24]:
        assert text in CHOICES
    assert results[-1][2].finish is not None


async def test_a_complete_match_ends_even_before_min_new_tokens(model_dirs: dict[str, Path]) -> None:
    """min_new_tokens holds EOS back, but once the grammar is complete EOS is all it allows: the row ends."""
    model = _load(model_dirs["llama"])
    params = SamplingParams(max_new_tokens=40, min_new_tokens=30, seed=1, grammar=grammar_for("choice", CHOICES))
    async with _running(model, 4) as engine:
        _, text, last = await _collect(engine.submit(Request("early", tuple(model.encode("Hi")), params)))
    assert text in CHOICES and last.finish is not None and last.finish.reason is FinishReason.EOS_TOKEN


async def test_a_length_limit_mid_object_is_reported_as_length(model_dirs: dict[str, Path]) -> None:
    model = _load(model_dirs["llama"])
    grammar = grammar_for("json_schema", json.dumps(SCHEMA))
    params = SamplingParams(max_new_tokens=3, temperature=0.0, grammar=grammar)
    async with _running(model, 4) as engine:
        _, text, last = await _collect(engine.submit(Request("short", tuple(model.encode("Hi")), params)))
    assert last.finish is not None and last.finish.reason is FinishReason.LENGTH
    with pytest.raises(ValueError):
        json.loads(text)


@pytest.mark.parametrize(
    ("kind", "value", "why"),
    [
        ("json_schema", "{not json", "is not valid JSON"),
        ("json_schema", json.dumps({"type": "strng"}), "strng"),
        ("json_schema", "[1, 2]", "must be a JSON object"),
        ("regex", "a(b", "unclosed group"),
        ("choice", [], "at least one"),
        ("grammar", "root ::= (", "is not a valid EBNF"),
    ],
)
def test_an_invalid_constraint_says_what_is_wrong(kind: str, value: str | list[str], why: str) -> None:
    with pytest.raises(GrammarError, match=re.escape(why)):
        grammar_for(kind, value)


async def test_a_grammar_being_built_holds_back_only_its_own_request(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its build runs off the step loop: a stream already running keeps getting tokens meanwhile."""
    from modelserve.engine import grammar as grammar_module

    release = asyncio.Event()
    built = grammar_module.Grammars._build
    loop = asyncio.get_running_loop()

    def slow_build(self: grammar_module.Grammars, text: str) -> object:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=60)
        return built(self, text)

    monkeypatch.setattr(grammar_module.Grammars, "_build", slow_build)
    model = _load(model_dirs["llama"])
    prompt = model.encode("Hello")
    async with _running(model, 4) as engine:
        running = engine.submit(_greedy(0, prompt, 30))
        constrained = engine.submit(_constrained(1, prompt, grammar_for("choice", CHOICES)))
        ids, _, last = await _collect(running)  # finishes while the grammar is still being built
        assert len(ids) == 30 and last.finish is not None
        release.set()
        _, text, _ = await _collect(constrained)
    assert text in CHOICES


# ---- through the server's faces ---------------------------------------------------------------------------------

TIMEOUT_S = 60


@pytest.fixture()
def openai_client(llama_server: ServerProcess) -> Iterator[OpenAI]:
    base = f"http://127.0.0.1:{llama_server.http_port}/v1"
    with OpenAI(base_url=base, api_key="none", max_retries=0, timeout=TIMEOUT_S) as client:
        yield client


def test_a_hundred_json_schema_answers_all_validate(openai_client: OpenAI) -> None:
    """Through the official client (response_format json_schema, as a completion: this tiny model has no chat
    template), 100 sampled answers side by side."""
    model = openai_client.models.list().data[0].id
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}}

    def one(seed: int) -> tuple[str, str | None]:
        reply = openai_client.completions.create(
            model=model,
            prompt="A record, please:",
            max_tokens=200,
            temperature=1.0,
            seed=seed,
            extra_body={"response_format": response_format},
        )
        return reply.choices[0].text, reply.choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(100)))
    for text, reason in answers:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_regex_choice_grammar_and_json_object_on_the_openai_face(openai_client: OpenAI) -> None:
    model = openai_client.models.list().data[0].id
    grammar = 'root ::= "x" digit digit\ndigit ::= [0-9]'
    for seed in range(4):
        for extra, check in (
            ({"guided_regex": REGEX}, lambda t: re.fullmatch(REGEX, t)),
            ({"guided_choice": CHOICES}, lambda t: t in CHOICES),
            ({"structured_outputs": {"grammar": grammar}}, lambda t: re.fullmatch(r"x[0-9]{2}", t)),
        ):
            reply = openai_client.completions.create(
                model=model, prompt="Answer:", max_tokens=200, temperature=1.0, seed=seed, extra_body=extra
            )
            assert check(reply.choices[0].text), (extra, reply.choices[0].text)
        # Any object: nothing bounds its strings, so a random model may well run out of tokens in one; what it
        # finished is an object, and what it did not says "length".
        reply = openai_client.completions.create(
            model=model,
            prompt="Answer:",
            max_tokens=60,
            seed=seed,
            extra_body={"response_format": {"type": "json_object"}},
        )
        text = reply.choices[0].text
        assert text.startswith("{") and (
            reply.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict)
        )


def test_a_hundred_json_schema_answers_validate_on_the_vllm_face(
    llama_server: ServerProcess, model_dirs: dict[str, Path]
) -> None:
    """vLLM's gRPC face, through its generated stubs (grpcurl, the issue's client, is not packaged for this
    Debian): the constraint oneof's json_schema, 100 sampled answers side by side, each parsed from its
    token ids with the model's tokenizer, as a router detokenizes."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dirs["llama"] / "tokenizer.json"))
    with llama_server.channel() as channel:
        theirs = vpb_grpc.VllmEngineStub(channel)

        def one(seed: int) -> tuple[str, str]:
            sampling = vpb.SamplingParams(max_tokens=200, seed=seed, json_schema=json.dumps(SCHEMA))
            request = vpb.GenerateRequest(text="A record:", sampling_params=sampling, stream=False)
            complete = list(theirs.Generate(request, timeout=TIMEOUT_S))[-1].complete
            return tokenizer.decode(list(complete.output_ids)), complete.finish_reason

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(100)))
    for text, reason in answers:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_constraints_on_the_grpc_faces(llama_server: ServerProcess) -> None:
    """modelserve.v1's structured_output and vLLM's constraint oneof: the same checks, the same outputs."""
    with llama_server.channel() as channel:
        ours = pb_grpc.GenerationServiceStub(channel)
        theirs = vpb_grpc.VllmEngineStub(channel)
        for seed in range(3):
            constraint = pb.StructuredOutput(json_schema=json.dumps(SCHEMA))
            params = pb.GenerationParameters(max_new_tokens=200, seed=seed, structured_output=constraint)
            text = "".join(
                m.text for m in ours.Generate(pb.GenerateRequest(prompt="Hi", params=params), timeout=TIMEOUT_S)
            )
            jsonschema.validate(json.loads(text), SCHEMA)
            sampling = vpb.SamplingParams(max_tokens=200, seed=seed, choice=vpb.ChoiceConstraint(choices=CHOICES))
            complete = list(
                theirs.Generate(vpb.GenerateRequest(text="Hi", sampling_params=sampling), timeout=TIMEOUT_S)
            )
            ids = list(complete[-1].complete.output_ids)
            choice_params = pb.GenerationParameters(
                max_new_tokens=200,
                seed=seed,
                structured_output=pb.StructuredOutput(choice=pb.ChoiceList(choices=CHOICES)),
            )
            same = list(ours.Generate(pb.GenerateRequest(prompt="Hi", params=choice_params), timeout=TIMEOUT_S))
            assert ids == [t for m in same for t in m.token_ids]
            assert "".join(m.text for m in same) in CHOICES
        with pytest.raises(grpc.RpcError) as err:
            bad = pb.GenerationParameters(structured_output=pb.StructuredOutput(json_schema='{"type": "strng"}'))
            list(ours.Generate(pb.GenerateRequest(prompt="Hi", params=bad), timeout=TIMEOUT_S))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "params.structured_output.json_schema is not valid: Invalid type: strng" in err.value.details()  # type: ignore[attr-defined]


def test_an_invalid_schema_is_a_400_naming_the_body_field(openai_client: OpenAI) -> None:
    model = openai_client.models.list().data[0].id
    for extra, field in (
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}},
            "response_format",
        ),
        ({"guided_regex": "a(b"}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            openai_client.completions.create(model=model, prompt="Hi", max_tokens=5, extra_body=extra)
        body = err.value.body
        assert isinstance(body, dict) and body["param"] == field, body
