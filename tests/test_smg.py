"""The smg router (PyPI `smg`, the gateway vLLM's and SGLang's communities run in front of gRPC workers) in
front of two modelserve replicas, as a new user starts it: `smg launch --worker-urls grpc://... --policy
cache_aware`, given no tokenizer path, and unable to read the model directory (it is moved away once the
replicas have loaded it, as on another host). smg finds vLLM's face, fetches the tokenizer with
GetTokenizer, subscribes to the replicas' KV events, and serves chat with the replicas' chat template;
answers equal a replica's own; requests that share a long prefix land on one replica. And three replicas
under smg through a SIGTERM and a SIGKILL (bench/smg_replicas.py's scenario, its pass conditions asserted).

Skips where smg cannot be installed (`make test`'s test tools install it)."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc

from bench import smg_replicas
from bench.harness import ServerProcess, start_server, terminate_all, wait_until

pytestmark = pytest.mark.skipif(
    smg_replicas.smg_binary() is None, reason="smg (PyPI `smg`) is not installed: `pip install smg==1.13.0`"
)

TEMPLATE = Path(__file__).with_name("tool_template.jinja")


@pytest.fixture(scope="module")
def replicas(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    root = tmp_path_factory.mktemp("smg")
    model = root / "model"
    shutil.copytree(model_dirs["llama"], model)
    servers = [
        start_server(root, "--model", str(model), "--chat-template", str(TEMPLATE), name=f"replica{i}")
        for i in range(2)
    ]
    try:
        for server in servers:
            server.wait_serving()
        model.rename(root / "moved")  # the router cannot read it: it must ask the replicas for the tokenizer
        yield servers
    finally:
        terminate_all(servers)
    for server in servers:  # smg's KV event subscriptions, cut by the shutdown, are no server error
        assert server.log_errors() == [], server.log()[-3000:]


@pytest.fixture(scope="module")
def router(replicas: list[ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    with smg_replicas.router(replicas, tmp_path_factory.mktemp("smg-log")) as smg:
        yield smg.base, smg.log_path


def _client(base: str) -> OpenAI:
    return OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)


MESSAGES: Any = [{"role": "user", "content": "Tell me about the fox."}]


def test_chat_and_completions_through_smg_equal_a_replicas_own(
    router: tuple[str, Path], replicas: list[ServerProcess]
) -> None:
    base, log = router
    own = OpenAI(base_url=f"http://127.0.0.1:{replicas[0].http_port}/v1", api_key="none", max_retries=0)
    model = own.models.list().data[0].id
    with _client(base) as client:
        chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
        expected = own.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
        assert chat.choices[0].message.content == expected.choices[0].message.content
        streamed = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=12, temperature=0, stream=True
        )
        # A random model's answer may end inside a UTF-8 character: smg's stream holds those bytes back, its
        # whole answer shows them as U+FFFD. The text before them is the same.
        joined = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert joined.rstrip("\ufffd") == (chat.choices[0].message.content or "").rstrip("\ufffd")
        prompt = "Once upon a time"
        text = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0).choices[0].text
        ours = own.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0).choices[0].text
        assert text.rstrip("\ufffd") == ours.rstrip("\ufffd")
    lines = log.read_text()
    assert "Fetching tokenizer from worker" in lines, "smg read the tokenizer from the replicas (GetTokenizer)"
    assert "does not implement" not in lines, "every RPC smg calls is served (SubscribeKvEvents included)"
    assert "KV event stream connected" in re.sub(r"\x1b\[[0-9;]*m", "", lines), "smg reads our KV events"


def test_a_shared_long_prefix_lands_on_one_replica(router: tuple[str, Path], replicas: list[ServerProcess]) -> None:
    base, _ = router
    prefix = " ".join(["The history of the quick brown fox and the lazy dog, told at length."] * 6)

    def finished() -> list[float]:
        return [s.metric("modelserve_requests_finished_total") for s in replicas]

    before = finished()
    with _client(base) as client:
        model = client.models.list().data[0].id
        for i in range(6):
            client.completions.create(model=model, prompt=f"{prefix} Part {i}:", max_tokens=2, temperature=0)
    counts = wait_until(finished, lambda now: sum(now) - sum(before) >= 6, 30)
    per_replica = sorted(now - then for now, then in zip(counts, before, strict=True))
    assert per_replica == [0, 6], f"requests per replica: {per_replica}"


def test_get_loads_shows_throughput_under_load(replicas: list[ServerProcess]) -> None:
    with replicas[0].channel() as channel:
        stub = vpb_grpc.VllmEngineStub(channel)
        params = vpb.SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        list(stub.Generate(vpb.GenerateRequest(text="Hello", sampling_params=params), timeout=60))
        load = stub.GetLoads(vpb.GetLoadsRequest(), timeout=60).loads[0]
    assert load.gen_throughput > 0 and load.max_running_requests > 0


@pytest.mark.timeout(300)
def test_three_replicas_through_sigterm_and_sigkill_under_smg(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    result = asyncio.run(smg_replicas.scenario(model_dirs["llama"], tmp_path))
    assert result.problems() == [], smg_replicas.table(result)
    assert result.running_at_term > 0 and result.running_at_kill > 0
