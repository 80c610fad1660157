"""The OpenAI-compatible HTTP API (server/openai/app.py) on a real server, driven by the official `openai` client,
unmodified: chat and text completions, streamed and whole, the same text as the gRPC RPCs give; models;
errors in OpenAI's shape; token auth; a client that disconnects mid-stream; and the HTTP port's phases
(loading, serving, draining, closed)."""

from __future__ import annotations

import functools
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
from openai import OpenAI

from bench.harness import ServerProcess, is_idle, start_server, wait_idle, wait_until
from tests.conftest import LONG, long_args

TOKEN = "http-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
AUTH_HEADERS = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "tiny-llama"
# A plain chat template: the tiny test model has none of its own.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MESSAGES: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
CALL_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def server(long_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny Llama (long context: a LONG stream is still running when a test acts) with a chat template and
    a bearer token (start_server gives it a free --http-port)."""
    root = tmp_path_factory.mktemp("http-server")
    template = root / "chat.jinja"
    template.write_text(TEMPLATE)
    server = start_server(
        root,
        *("--model", str(long_model_dir), "--served-model-name", MODEL, "--chat-template", str(template)),
        *("--max-batch-size", "4", "--grace-s", "5", *long_args(4)),
        env={"MODELSERVE_AUTH_TOKEN": TOKEN},
    )
    try:
        server.wait_serving()
        yield server
    finally:
        server.terminate()


def _base_url(server: ServerProcess) -> str:
    return f"http://127.0.0.1:{server.http_port}"


def _post_raw(server: ServerProcess, path: str, content: bytes) -> httpx.Response:
    """`content` as a JSON request body, byte for byte (what the openai client would never send)."""
    return httpx.post(
        f"{_base_url(server)}{path}",
        content=content,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        timeout=CALL_TIMEOUT_S,
    )


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[OpenAI]:
    # max_retries=0: a refusal must reach the test as it was sent, not be retried.
    with OpenAI(base_url=f"{_base_url(server)}/v1", api_key=TOKEN, max_retries=0, timeout=CALL_TIMEOUT_S) as client:
        yield client


@pytest.fixture()
def stub(server: ServerProcess) -> Iterator[Any]:
    with server.channel() as channel:
        yield pb_grpc.GenerationServiceStub(channel)


# ---- chat and text completions ------------------------------------------------------------------------------


def test_chat_stream_streams_deltas_and_ends_with_finish_reason(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            max_tokens=24,
            temperature=0,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    pieces = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    assert sum(1 for piece in pieces if piece) >= 2, "the reply comes in pieces"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    last = chunks[-1]  # stream_options.include_usage: one more chunk, with usage and no choices
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 24
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0)
    assert "".join(pieces) == whole.choices[0].message.content


def test_chat_whole_returns_usage_and_the_grpc_chat_text(client: OpenAI, stub: Any) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    usage = reply.usage
    assert usage is not None and usage.completion_tokens == 12
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + 12

    request = pb.ChatRequest(
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in MESSAGES],
        params=pb.GenerationParameters(max_new_tokens=12, temperature=0),
    )
    responses = list(stub.Chat(request, metadata=AUTH, timeout=CALL_TIMEOUT_S))
    assert "".join(r.text for r in responses) == choice.message.content  # one template, one tokenization
    assert responses[0].usage.input_tokens == usage.prompt_tokens


def test_text_parts_are_taken_and_other_parts_refused_naming_the_field(client: OpenAI) -> None:
    parts: Any = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=2, temperature=0
    )
    assert reply.choices[0].finish_reason == "length"
    image: Any = [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": image}])
    assert err.value.param == "messages[0].content[1].type" and "text only" in err.value.message


def test_completions_whole_and_streamed_are_the_grpc_generate_text(client: OpenAI, stub: Any) -> None:
    whole = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0, logprobs=2, seed=3)
    choice = whole.choices[0]
    assert whole.object == "text_completion" and choice.finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 8
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.token_logprobs is not None
    assert len(logprobs.tokens) == 8 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert logprobs.top_logprobs is not None and all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)

    streamed = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == choice.text

    request = pb.GenerateRequest(prompt="Hello", params=pb.GenerationParameters(max_new_tokens=8, temperature=0))
    assert "".join(r.text for r in stub.Generate(request, metadata=AUTH, timeout=CALL_TIMEOUT_S)) == choice.text


def _prompt_log_softmax(long_model_dir: Path, ids: list[int]) -> Any:
    """A transformers forward's log-softmax over a prompt (fp32, as the server runs): row p scores token p + 1."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(long_model_dir, dtype=torch.float32)
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_echo_with_logprobs_scores_the_prompt_as_a_plain_forward(client: OpenAI, long_model_dir: Path) -> None:
    """What lm-evaluation-harness's loglikelihood sends: token ids, echo, logprobs 1, max_tokens 1. The prompt's
    tokens come first (the first with null values), each equal to a transformers forward's log-softmax."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(long_model_dir / "tokenizer.json")).encode("The quick brown fox jumps over").ids
    expected = _prompt_log_softmax(long_model_dir, ids)
    reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert len(logprobs.token_logprobs) == len(ids) + 1  # the prompt, then the generated token
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for p in range(len(ids) - 1):
        assert logprobs.token_logprobs[p + 1] == pytest.approx(float(expected[p, ids[p + 1]]), abs=1e-4)
        assert list(logprobs.top_logprobs[p + 1].values()) == pytest.approx([float(expected[p].max())], abs=1e-4)
    assert logprobs.text_offset is not None and logprobs.text_offset[0] == 0
    assert reply.choices[0].text.startswith(Tokenizer.from_file(str(long_model_dir / "tokenizer.json")).decode(ids))

    text = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=3, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=3, temperature=0)
    assert text.choices[0].text == "Once upon" + plain.choices[0].text
    streamed = list(
        client.completions.create(model=MODEL, prompt="Once upon", max_tokens=3, temperature=0, echo=True, stream=True)
    )
    assert streamed[0].choices[0].text == "Once upon"
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text.choices[0].text


def test_prompt_logprobs_in_vllms_shape(client: OpenAI, long_model_dir: Path) -> None:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(long_model_dir / "tokenizer.json")).encode("Once upon a time").ids
    expected = _prompt_log_softmax(long_model_dir, ids)
    reply = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=1, extra_body={"prompt_logprobs": 2}
    )
    scored = reply.choices[0].model_extra["prompt_logprobs"]  # type: ignore[index]
    assert scored[0] is None and len(scored) == len(ids)
    for p in range(len(ids) - 1):
        entry = scored[p + 1]
        own = entry[str(ids[p + 1])]
        assert own["logprob"] == pytest.approx(float(expected[p, ids[p + 1]]), abs=1e-4)
        assert own["rank"] == int((expected[p] > expected[p, ids[p + 1]]).sum()) + 1
        assert {int(t) for t, v in entry.items() if v["rank"] <= 2} == set(expected[p].topk(2).indices.tolist())
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    assert chat.model_extra["prompt_logprobs"][0] is None  # type: ignore[index]
    for arguments, param in (
        ({"stream": True, "extra_body": {"prompt_logprobs": 1}}, "prompt_logprobs"),
        ({"extra_body": {"echo": True}}, "echo"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, **arguments)
        assert isinstance(err.value.body, dict) and err.value.body["param"] == param


PROMPTS = ["Hello", "Once upon a time", "The quick brown fox jumps"]


def test_a_list_of_prompts_gives_a_choice_per_prompt_in_order(client: OpenAI) -> None:
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0) for p in PROMPTS]
    whole = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=6, temperature=0, logprobs=1)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.text for c in whole.choices] == [a.choices[0].text for a in alone]
    assert all(c.logprobs is not None and len(c.logprobs.tokens or []) == 6 for c in whole.choices)
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone if a.usage is not None)
    assert whole.usage.completion_tokens == 18

    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPTS,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = ["", "", ""]
    endings = []
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices  # one choice per chunk, named by its index
        texts[choice.index] += choice.text
        if choice.finish_reason is not None:
            endings.append(choice.index)
    assert texts == [c.text for c in whole.choices] and sorted(endings) == [0, 1, 2]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 18


def test_n_samples_share_one_prefill_and_count_the_prompt_once(client: OpenAI, server: ServerProcess) -> None:
    """n=4: four choices, each its own seed stream (seed + j, reproducible alone), the prompt's full blocks
    computed once and shared by the other three (the prefix cache's hit counter), usage with the prompt once."""
    prompt = "n samples share one prefill: " + " ".join(f"w{i}" for i in range(60))
    hits = "modelserve_prefix_cache_hit_tokens_total"
    before = server.metric(hits)
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, n=4, temperature=1.0, seed=21)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert len({c.text for c in reply.choices}) > 1  # four draws, not one
    usage = reply.usage
    assert usage is not None and usage.completion_tokens == 32
    shared = (usage.prompt_tokens - 1) // 16 * 16
    assert shared > 0 and server.metric(hits) - before >= 3 * shared  # the other three reused the first's blocks
    for j in (0, 3):  # sample j is what a lone request with seed + j samples
        alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0, seed=21 + j)
        assert alone.choices[0].text == reply.choices[j].text
        assert alone.usage is not None and alone.usage.prompt_tokens == usage.prompt_tokens  # counted once

    chunks = list(
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, n=2, temperature=0, stream=True)
    )
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0)
    assert texts == {0: whole.choices[0].message.content, 1: whole.choices[0].message.content}  # greedy: equal


def test_a_list_answer_is_named_after_the_callers_request_id(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": PROMPTS[:2], "max_tokens": 2, "temperature": 0}
    headers = {**AUTH_HEADERS, "X-Request-Id": "list-of-two"}
    response = httpx.post(f"{_base_url(server)}/v1/completions", json=body, headers=headers, timeout=CALL_TIMEOUT_S)
    assert response.status_code == 200 and response.headers["x-request-id"] == "list-of-two"
    assert response.json()["id"] == "cmpl-list-of-two" and len(response.json()["choices"]) == 2
    headers["X-Request-Id"] = "x" * 127  # a valid id alone, too long once each choice's -N is added
    response = httpx.post(f"{_base_url(server)}/v1/completions", json=body, headers=headers, timeout=CALL_TIMEOUT_S)
    assert response.status_code == 400 and "X-Request-Id is 127 characters" in response.json()["error"]["message"]


def test_best_of_returns_the_samples_with_the_highest_cumulative_logprob(client: OpenAI) -> None:
    """best_of=4, n=2, with a seed: the four samples are seed + j's, and the two returned are the two whose
    tokens' log-probabilities sum highest, best first."""
    prompt, sampled = "Best of four", {"max_tokens": 6, "temperature": 1.5, "extra_body": {"ignore_eos": True}}
    reply = client.completions.create(model=MODEL, prompt=prompt, n=2, best_of=4, seed=31, **sampled)
    alone = [
        client.completions.create(model=MODEL, prompt=prompt, seed=31 + j, logprobs=0, **sampled).choices[0]
        for j in range(4)
    ]
    total = [sum(c.logprobs.token_logprobs or []) for c in alone if c.logprobs is not None]
    best = sorted(range(4), key=lambda j: -total[j])[:2]
    assert [c.text for c in reply.choices] == [alone[j].text for j in best]
    assert [c.index for c in reply.choices] == [0, 1] and all(c.logprobs is None for c in reply.choices)
    assert reply.usage is not None and reply.usage.completion_tokens == 24  # every sample generated counts
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=prompt, n=3, best_of=2)
    assert err.value.param == "n"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=prompt, n=1, best_of=2, stream=True)
    assert err.value.param == "best_of"


def test_one_bad_prompt_in_a_list_refuses_the_request_and_runs_none(client: OpenAI, server: ServerProcess) -> None:
    """Every prompt is checked before any is submitted: the good ones neither run nor show as cancelled."""
    before = _length_finished(server), _cancelled(server)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=["Hello", ""], max_tokens=4, temperature=0)
    assert "(prompt[1])" in err.value.message and err.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=[], max_tokens=4)
    assert "1 to" in err.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=["Hello", 5], max_tokens=4)  # type: ignore[list-item]
    assert (_length_finished(server), _cancelled(server)) == before  # the first prompt was never submitted


def test_a_stop_sequence_ends_the_text_before_it_with_finish_reason_stop(client: OpenAI) -> None:
    free = client.completions.create(model=MODEL, prompt="Hello", max_tokens=16, temperature=0).choices[0].text
    middle = len(free) // 2
    stop = free[middle : middle + 3]
    stopped = client.completions.create(model=MODEL, prompt="Hello", max_tokens=16, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == free[: free.index(stop)]


def test_models_lists_the_served_model(client: OpenAI) -> None:
    assert [model.id for model in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_server_sent_events_on_the_wire(server: ServerProcess) -> None:
    """What curl shows: `data: {json}` events, the last one `data: [DONE]`."""
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "stream": True}
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Request-Id": "wire-1"}
    url = f"{_base_url(server)}/v1/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=CALL_TIMEOUT_S) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"] == "wire-1"
        events = [line for line in response.iter_lines() if line]
    assert all(event.startswith("data: ") for event in events) and events[-1] == "data: [DONE]"
    assert '"id":"cmpl-wire-1"' in events[0]


# ---- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "param"),
    [
        ({"temperature": 500.0}, "temperature"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
        ({"extra_body": {"priority": 5000}}, "priority"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"extra_body": {"min_p": 1.5}}, "min_p"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"logit_bias": {"five": 1}}, "logit_bias"),
    ],
    ids=[
        "temperature",
        "max-tokens",
        "n",
        "top-logprobs",
        "priority",
        "presence",
        "frequency",
        "min-p",
        "bias-value",
        "bias-id-range",
        "bias-id-text",
    ],
)
def test_bad_parameters_are_400_in_openai_shape(client: OpenAI, arguments: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, **arguments)
    assert err.value.status_code == 400
    body = err.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error" and body["param"] == param
    assert param in body["message"] and "params." not in body["message"]  # the body's names, not the proto's


def test_penalties_bias_and_min_p_act_as_on_grpc(client: OpenAI, stub: Any) -> None:
    """The OpenAI names reach the same sampler as modelserve.v1's fields: the same seeded output on both faces,
    and a logit bias of +100 on one token makes every output token that token."""
    sampled = {"temperature": 1.0, "seed": 11, "presence_penalty": 1.5, "frequency_penalty": 0.5}
    reply = client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=12, extra_body={"min_p": 0.05, "ignore_eos": True}, **sampled
    )
    params = pb.GenerationParameters(max_new_tokens=12, min_p=0.05, ignore_eos=True, **sampled)
    responses = list(stub.Generate(pb.GenerateRequest(prompt="Once upon", params=params), metadata=AUTH))
    assert "".join(r.text for r in responses) == reply.choices[0].text

    forced = 42
    biased = pb.GenerationParameters(max_new_tokens=6, temperature=0, ignore_eos=True, logit_bias={forced: 100})
    responses = list(stub.Generate(pb.GenerateRequest(prompt="Once upon", params=biased), metadata=AUTH))
    assert [t for r in responses for t in r.token_ids] == [forced] * 6
    reply = client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=6, temperature=0, logit_bias={str(forced): 100}
    )
    assert reply.choices[0].text == "".join(r.text for r in responses)


@pytest.mark.parametrize(
    ("path", "arguments", "param"),
    [
        ("chat", {"response_format": {"type": "structural_tag", "format": {}}}, "response_format"),
        ("chat", {"extra_body": {"structured_outputs": {"structural_tag": "{}"}}}, "structured_outputs"),
        ("chat", {"extra_body": {"functions": [{"name": "f", "parameters": {}}]}}, "functions"),
        ("completions", {"extra_body": {"use_beam_search": True}}, "use_beam_search"),
    ],
)
def test_what_this_server_does_not_serve_is_refused_never_ignored(
    client: OpenAI, path: str, arguments: dict[str, Any], param: str
) -> None:
    """unserved.py's one table: a field that asks for a missing feature is a 400 naming it, with the reason."""
    with pytest.raises(openai.BadRequestError) as err:
        if path == "chat":
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, **arguments)
        else:
            client.completions.create(model=MODEL, prompt="Once upon", max_tokens=2, **arguments)
    body = err.value.body
    assert isinstance(body, dict) and body["param"] == param and "is not supported: this server" in body["message"]


def test_an_unknown_field_is_ignored_and_logged_once(client: OpenAI, server: ServerProcess) -> None:
    for _ in range(2):
        reply = client.completions.create(
            model=MODEL, prompt="Once upon", max_tokens=2, extra_body={"frobnicate_level": 3}
        )
        assert reply.choices[0].finish_reason in ("length", "stop")
    assert server.log().count("ignoring the request field 'frobnicate_level'") == 1


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert err.value.code == "model_not_found" and err.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_a_body_that_is_not_json_is_400(server: ServerProcess) -> None:
    response = _post_raw(server, "/v1/chat/completions", b"{not json")
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_lone_surrogate_in_the_body_is_400_not_a_server_fault(server: ServerProcess, path: str) -> None:
    """Valid JSON may escape half a UTF-16 pair, which no text can hold: refused like any bad input."""
    body = b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "prompt": "a\\ud800b", "stop": ["\\udfff"]}'
    response = _post_raw(server, path, body)
    assert response.status_code == 400, response.text
    assert "surrogate" in response.json()["error"]["message"]
    assert " ERROR " not in server.log()


def test_token_auth_and_open_health(server: ServerProcess) -> None:
    with (
        OpenAI(base_url=f"{_base_url(server)}/v1", api_key="not-the-token", max_retries=0) as stranger,
        pytest.raises(openai.AuthenticationError) as err,
    ):
        stranger.models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    assert "not-the-token" not in err.value.message

    anonymous = httpx.post(f"{_base_url(server)}/v1/completions", json={"prompt": "Hi"}, timeout=CALL_TIMEOUT_S)
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
    assert anonymous.json()["error"]["message"].startswith("missing bearer token")

    health = httpx.get(f"{_base_url(server)}/health", timeout=CALL_TIMEOUT_S)  # open, as gRPC health is
    assert (health.status_code, health.json()) == (200, {"status": "serving"})


# ---- a client that goes away --------------------------------------------------------------------------------


def _cancelled(server: ServerProcess) -> float:
    return server.metric("modelserve_requests_finished_total", finish_reason="cancelled")


def test_http_requests_show_in_the_metrics(server: ServerProcess, client: OpenAI) -> None:
    """The same request metrics as gRPC calls, and http.server.request.duration per route and status."""
    route = {"http_route": "/v1/completions", "http_request_method": "POST"}
    duration = "http_server_request_duration_seconds_count"
    ok, finished = server.metric(duration, http_response_status_code="200", **route), _length_finished(server)
    rejected = server.metric("modelserve_requests_rejected_total", error_type="invalid_argument")
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="Hello", top_p=2.0)
    # http.server.request.duration is recorded once the app has returned, a moment after the last byte went out.
    answered = functools.partial(server.metric, duration, **route)
    assert wait_until(lambda: answered(http_response_status_code="200"), lambda n: n > ok) == ok + 1
    assert wait_until(lambda: answered(http_response_status_code="400"), lambda n: n >= 1) >= 1
    assert _length_finished(server) == finished + 1
    assert server.metric("modelserve_requests_rejected_total", error_type="invalid_argument") == rejected + 1


def test_this_faces_own_refusals_count_as_rejected(server: ServerProcess, client: OpenAI) -> None:
    """A generation request refused before the shared path (its body, its model, an unsupported field) counts
    in modelserve.requests.rejected, as that path's own refusals do, by the gRPC code's name."""
    invalid, not_found = ({"error_type": t} for t in ("invalid_argument", "not_found"))
    before = [server.metric("modelserve_requests_rejected_total", **labels) for labels in (invalid, not_found)]
    response = _post_raw(server, "/v1/completions", b"{not json")
    assert response.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="Hello", extra_body={"use_beam_search": True})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    after = [server.metric("modelserve_requests_rejected_total", **labels) for labels in (invalid, not_found)]
    assert after == [before[0] + 2, before[1] + 1]


def _length_finished(server: ServerProcess) -> float:
    return server.metric("modelserve_requests_finished_total", finish_reason="length")


class _AuthorizedHealth:
    """The Health RPC with the token, for bench.harness.wait_idle."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    def Health(self, request: pb.HealthRequest, timeout: float) -> pb.HealthResponse:
        return self._stub.Health(request, timeout=timeout, metadata=AUTH)


def test_a_client_that_disconnects_mid_stream_frees_its_row(server: ServerProcess, client: OpenAI, stub: Any) -> None:
    before = _cancelled(server)
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, max_tokens=LONG, temperature=0, extra_body={"ignore_eos": True}
    )
    first = [next(stream) for _ in range(3)]  # the role, then text: it is running, far from its end
    assert any(chunk.choices[0].delta.content for chunk in first)
    stream.close()  # the connection closes under the running generation

    health = wait_idle(_AuthorizedHealth(stub), until=lambda h: is_idle(h) and _cancelled(server) > before)
    assert is_idle(health), health
    assert _cancelled(server) == before + 1  # aborted, not run to its end
    assert server.log_errors() == [], server.log()  # a client's disconnect is no server error


def test_a_client_that_leaves_before_a_whole_answer_is_no_server_error(
    server: ServerProcess, client: OpenAI, stub: Any
) -> None:
    """stream=false, and the client gives up waiting: the generation is aborted, and the request is recorded as
    499 (client closed request), not as a 500."""
    route = {"http_route": "/v1/completions", "http_request_method": "POST"}
    duration = "http_server_request_duration_seconds_count"
    before, faults = _cancelled(server), server.metric(duration, http_response_status_code="500", **route)
    left = server.metric(duration, http_response_status_code="499", **route)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": LONG, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client closes the connection when its read times out
        httpx.post(f"{_base_url(server)}/v1/completions", json=body, headers=AUTH_HEADERS, timeout=0.5)

    wait_idle(_AuthorizedHealth(stub), until=lambda h: is_idle(h) and _cancelled(server) > before)
    assert _cancelled(server) == before + 1
    # The response's metric is recorded once the app has returned.
    left_now = wait_until(lambda: server.metric(duration, http_response_status_code="499", **route), lambda n: n > left)
    assert left_now == left + 1
    assert server.metric(duration, http_response_status_code="500", **route) == faults
    assert server.log_errors() == [], server.log()


# ---- the HTTP port's phases ---------------------------------------------------------------------------------


def test_http_follows_the_server_phases(long_model_dir: Path, tmp_path: Path) -> None:
    """Its own server (no chat template, no token): 503 while loading, 200 while serving, 503 for new requests
    while a running stream goes on after SIGTERM, then the port closes and the process exits 0. The stream asks
    for LONG tokens, so it is still running however slow the checks are."""
    args = ("--model", str(long_model_dir), "--served-model-name", MODEL, "--grace-s", "120")
    server = start_server(tmp_path, *args, *long_args(1))
    base = _base_url(server)
    not_serving, serving = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
    try:
        with server.watch_health() as statuses:
            assert next(statuses) == not_serving  # both ports are open; the model loads
            loading = httpx.get(f"{base}/health", timeout=CALL_TIMEOUT_S)
            assert (loading.status_code, loading.json()) == (503, {"status": "loading"})
            early = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi"}, timeout=CALL_TIMEOUT_S)
            assert early.status_code == 503 and "still loading" in early.json()["error"]["message"]
            assert serving in statuses  # read on until the model is warm
            assert httpx.get(f"{base}/health", timeout=CALL_TIMEOUT_S).status_code == 200

            with OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=CALL_TIMEOUT_S) as client:
                with pytest.raises(openai.BadRequestError) as err:  # no template: the operator's to fix
                    client.chat.completions.create(model=MODEL, messages=MESSAGES)
                assert err.value.code == "failed_precondition" and "--chat-template" in err.value.message

                stream = client.completions.create(
                    model=MODEL,
                    prompt="Hi",
                    max_tokens=LONG,
                    temperature=0,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                assert next(stream).choices[0].text is not None  # running
                server.proc.send_signal(signal.SIGTERM)
                assert next(statuses) == not_serving  # the drain has begun

                draining = httpx.get(f"{base}/health", timeout=CALL_TIMEOUT_S)
                assert (draining.status_code, draining.json()) == (503, {"status": "draining"})
                with pytest.raises(openai.InternalServerError) as refused:
                    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
                assert refused.value.status_code == 503 and "shutting down" in refused.value.message

                # The running stream goes on through the drain, as the server itself says (its metrics port
                # serves until the process ends); closing it (its generation aborted) ends the drain. (The gRPC
                # drain test sees a stream run to its end within the grace period.)
                assert server.metric("modelserve_requests_running") == 1
                assert all(chunk.choices[0].finish_reason is None for chunk in (next(stream) for _ in range(3)))
                stream.close()
        assert server.proc.wait(CALL_TIMEOUT_S) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/health", timeout=CALL_TIMEOUT_S)
        assert server.log_errors() == [], server.log()
    finally:
        server.terminate()
