"""Multi-LoRA: three random-weight adapters built with PEFT on the tiny Llama; rows of all three and of the bare
base model in one batch, each equal token for token to PEFT's merged model for its adapter (fp32, greedy);
fewer slots than adapters; adapters that do not fit refused with what does not fit."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch
from modelserve_client import ModelServeClient
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
from openai import OpenAI

from modelserve.engine.engine import Engine, EngineConfig
from modelserve.engine.request import Request, SamplingParams
from modelserve.models.loader import LoadedModel, load_model
from modelserve.models.lora import LoraAdapter, LoraError, LoraTarget, lora_target, read_adapter
from tests.conftest import ServerProcess, start_server

peft = pytest.importorskip("peft", reason="PEFT (the dev extras' `peft`) builds the adapters and the references")

# name -> (rank, alpha, target modules, rslora): different ranks, modules and scalings.
ADAPTERS: dict[str, tuple[int, int, list[str], bool]] = {
    "all-r8": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    "qv-r4": (4, 8, ["q_proj", "v_proj"], False),
    "mlp-r16": (16, 8, ["gate_proj", "up_proj", "down_proj"], True),
}
PROMPT = "The quick brown fox jumps over the lazy dog"
NEW_TOKENS = 12
HOLD_TOKENS = 1000  # a stream that runs through the loads and unloads of the server test
ENGINE_HOLD_TOKENS = 200  # and of the engine test, each token compared with PEFT's


def _build_adapter(base: Path, out: Path, seed: int, rank: int, alpha: int, modules: list[str], rslora: bool) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=modules, use_rslora=rslora, init_lora_weights=False
    )
    peft.get_peft_model(model, config).save_pretrained(out)


@pytest.fixture(scope="module")
def adapters(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for seed, (name, (rank, alpha, modules, rslora)) in enumerate(ADAPTERS.items()):
        dirs[name] = root / name
        _build_adapter(model_dirs["llama"], dirs[name], seed, rank, alpha, modules, rslora)
    return dirs


@pytest.fixture(scope="module")
def model(model_dirs: dict[str, Path]) -> LoadedModel:
    return load_model(str(model_dirs["llama"]), torch.device("cpu"), torch.float32)


def _merged_greedy(base: Path, adapter: Path | None, prompt_ids: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """PEFT's merged model's greedy continuation (the bare base model's without an adapter)."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
    )
    return list(out[0, len(prompt_ids) :].tolist())


async def _generate(engine: Engine, requests: list[Request]) -> list[list[int]]:
    async def one(request: Request) -> list[int]:
        ids: list[int] = []
        async for event in engine.submit(request):
            ids += event.token_ids
            if event.finish is not None:
                assert not event.finish.error, event.finish.error
        return ids

    return list(await asyncio.gather(*(one(r) for r in requests)))


def _target(model: LoadedModel) -> LoraTarget:
    target = lora_target(model.model.config)
    assert target is not None
    return target


def _engine(model: LoadedModel, max_loras: int) -> Engine:
    config = EngineConfig(max_batch_size=8, kv_cache_bytes=64 << 20, enable_lora=True, max_loras=max_loras)
    return Engine(model.model, model.tokenizer, model.eos_token_ids, config, model.max_sequence_length)


@pytest.fixture()
def checked(adapters: dict[str, Path], model: LoadedModel) -> Iterator[list[LoraAdapter]]:
    yield [read_adapter(name, str(path), _target(model), 16) for name, path in adapters.items()]


@pytest.mark.parametrize("max_loras", [4, 2])
async def test_a_batch_of_three_adapters_and_the_base_equals_peft_merged(
    model_dirs: dict[str, Path],
    adapters: dict[str, Path],
    model: LoadedModel,
    checked: list[LoraAdapter],
    max_loras: int,
) -> None:
    """Every row of one batch with its own adapter (or none) gives what PEFT's merged model gives for it; with two
    slots for three adapters, the third waits for a slot and is loaded into it."""
    prompt_ids = model.encode(PROMPT)
    names = ["", *adapters]
    expected = {name: _merged_greedy(model_dirs["llama"], adapters.get(name), prompt_ids) for name in names}
    assert len({tuple(ids) for ids in expected.values()}) == len(names), "each adapter changes the output"
    engine = _engine(model, max_loras)
    engine.start(asyncio.get_running_loop())
    try:
        for adapter in checked:
            engine.add_lora(adapter)
        params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        requests = [Request(f"r{i}-{name}", tuple(prompt_ids), params, lora=name) for i, name in enumerate(names * 2)]
        got = await _generate(engine, requests)
    finally:
        engine.shutdown()
    for request, ids in zip(requests, got, strict=True):
        assert ids == expected[request.lora], request.request_id


def _edit_config(path: Path, **changes: Any) -> None:
    config_path = path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **changes}))


def test_adapters_that_do_not_fit_are_refused_with_what_does_not_fit(
    adapters: dict[str, Path], model: LoadedModel, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    target = _target(model)
    with pytest.raises(LoraError, match="r=16 is over --max-lora-rank 8"):
        read_adapter("big", str(adapters["mlp-r16"]), target, 8)
    with pytest.raises(LoraError, match=r"no adapter_config\.json"):
        read_adapter("none", str(tmp_path), target, 16)
    dora = tmp_path / "dora"
    shutil.copytree(adapters["qv-r4"], dora)
    _edit_config(dora, use_dora=True)
    with pytest.raises(LoraError, match="DoRA"):
        read_adapter("dora", str(dora), target, 16)
    # An adapter trained for another base model: its shapes are not this model's.
    other = tmp_path / "other-base"
    from transformers import AutoConfig, AutoModelForCausalLM

    wider = AutoConfig.from_pretrained(model_dirs["llama"])
    wider.hidden_size *= 2
    wider.save_pretrained(other / "base")
    AutoModelForCausalLM.from_config(wider).save_pretrained(other / "base")
    _build_adapter(other / "base", other / "adapter", 0, 4, 8, ["q_proj"], False)
    with pytest.raises(LoraError, match=r"has shape .* needs .* another base model"):
        read_adapter("other", str(other / "adapter"), target, 16)
    # A layer this server does not adapt (the LM head).
    head = tmp_path / "head"
    _build_adapter(model_dirs["llama"], head, 0, 4, 8, ["q_proj", "lm_head"], False)
    with pytest.raises(LoraError, match="adapts a layer this server does not"):
        read_adapter("head", str(head), target, 16)


# ---- the server: adapters chosen by the OpenAI `model`, listed, loaded and unloaded at run time ----


@pytest.fixture(scope="module")
def lora_server(
    model_dirs: dict[str, Path], adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Two adapters from the start, two slots (so a third adapter takes one an idle adapter held)."""
    modules = [f"{name}={adapters[name]}" for name in ("all-r8", "qv-r4")]
    server = start_server(
        tmp_path_factory.mktemp("lora-server"),
        "--model",
        str(model_dirs["llama"]),
        "--lora-modules",
        *modules,
        "--max-loras",
        "2",
        "--max-max-new-tokens",
        "4000",
    )
    try:
        server.wait_serving()
        yield server
    finally:
        server.terminate()
    assert server.log_errors() == []


@pytest.fixture(scope="module")
def expected(model_dirs: dict[str, Path], adapters: dict[str, Path], model: LoadedModel) -> dict[str, list[int]]:
    prompt_ids = model.encode(PROMPT)
    return {name: _merged_greedy(model_dirs["llama"], adapters.get(name), prompt_ids) for name in ["", *adapters]}


def _http(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=60)


def _lora_info(server: ServerProcess) -> dict[str, str]:
    """The labels of the server's vllm:lora_requests_info (the adapters of running and waiting requests)."""
    from prometheus_client.parser import text_string_to_metric_families

    with httpx.Client(timeout=10) as http:
        text = http.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "vllm:lora_requests_info")
    return dict(family.samples[0].labels)


def _openai(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="none", max_retries=0, timeout=60)


def _text(model: LoadedModel, ids: list[int]) -> str:
    """What a stream of `ids` reads as (a random model's last token may end inside a UTF-8 character)."""
    return str(model.tokenizer.decode(ids, skip_special_tokens=False)).rstrip("\ufffd")


def _complete(client: OpenAI, model: str, max_tokens: int = NEW_TOKENS) -> str:
    answer = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
    )
    assert answer.model == model and answer.usage is not None and answer.usage.completion_tokens == max_tokens
    return answer.choices[0].text.rstrip("\ufffd")


def test_the_models_list_names_each_adapter_with_the_base_as_parent(lora_server: ServerProcess) -> None:
    with _http(lora_server) as http:
        cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
        base = next(name for name, card in cards.items() if card["parent"] is None)
        assert set(cards) == {base, "all-r8", "qv-r4"}
        assert cards["all-r8"]["parent"] == base and cards["all-r8"]["root"].endswith("all-r8")
        assert http.get("/v1/models/qv-r4").json()["parent"] == base
        missing = http.get("/v1/models/nope")
        assert missing.status_code == 404 and "'all-r8'" in missing.json()["error"]["message"]


def test_rows_of_each_adapter_and_the_base_through_the_openai_api_equal_peft_merged(
    lora_server: ServerProcess, expected: dict[str, list[int]], model: LoadedModel
) -> None:
    """Concurrent completions, each naming its adapter (or the base model) as its `model`."""
    from concurrent.futures import ThreadPoolExecutor

    with _openai(lora_server) as client:
        base = client.models.list().data[0].id
        names = [base, "all-r8", "qv-r4"] * 3
        with ThreadPoolExecutor(len(names)) as pool:
            texts = list(pool.map(lambda name: _complete(client, name), names))
    for name, text in zip(names, texts, strict=True):
        assert text == _text(model, expected["" if name == base else name]), name


def test_adapters_load_and_unload_at_run_time_without_disturbing_running_streams(
    lora_server: ServerProcess, adapters: dict[str, Path], expected: dict[str, list[int]], model: LoadedModel
) -> None:
    """While a long stream runs on one adapter, a third adapter is loaded (into the slot the idle one held),
    serves, and is unloaded, and so is the idle one; the stream runs to its end, its text the adapter's. (The
    engine test below checks every token of such a stream against PEFT's.)"""
    with _openai(lora_server) as client, _http(lora_server) as http:
        running = client.completions.create(
            model="all-r8",
            prompt=PROMPT,
            max_tokens=HOLD_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = iter(running)
        text = next(chunks).choices[0].text
        path = str(adapters["mlp-r16"])
        loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "mlp-r16", "lora_path": path})
        assert loaded.status_code == 200 and "mlp-r16" in loaded.text
        assert _complete(client, "mlp-r16") == _text(model, expected["mlp-r16"])
        for name in ("mlp-r16", "qv-r4"):
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
        gone = http.post("/v1/completions", json={"model": "qv-r4", "prompt": PROMPT, "max_tokens": 2})
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        assert lora_server.metric("modelserve_requests_running") >= 1, "the long stream ran through all of it"
        in_use = _lora_info(lora_server)
        assert in_use["max_lora"] == "2" and in_use["running_lora_adapters"] == "all-r8"
        usage = None
        for chunk in chunks:
            text += "".join(choice.text for choice in chunk.choices)
            usage = chunk.usage or usage
        assert usage is not None and usage.completion_tokens == HOLD_TOKENS
        assert text.startswith(_text(model, expected["all-r8"]))
        again = http.post("/v1/load_lora_adapter", json={"lora_name": "qv-r4", "lora_path": str(adapters["qv-r4"])})
        assert again.status_code == 200
        assert _complete(client, "qv-r4") == _text(model, expected["qv-r4"])


async def test_a_running_adapters_every_token_is_unchanged_by_loads_and_unloads(
    model_dirs: dict[str, Path], adapters: dict[str, Path], model: LoadedModel, checked: list[LoraAdapter]
) -> None:
    """In the engine: a stream on one adapter, with two slots, while another adapter is unloaded and a third
    loaded into its slot and served; every token of the stream is PEFT's merged model's."""
    prompt_ids = model.encode(PROMPT)
    long_expected = _merged_greedy(model_dirs["llama"], adapters["all-r8"], prompt_ids, ENGINE_HOLD_TOKENS)
    by_name = {adapter.name: adapter for adapter in checked}
    engine = _engine(model, 2)
    engine.start(asyncio.get_running_loop())
    try:
        engine.add_lora(by_name["all-r8"])
        engine.add_lora(by_name["qv-r4"])
        params = SamplingParams(max_new_tokens=ENGINE_HOLD_TOKENS, temperature=0.0, ignore_eos=True)
        held: list[int] = []
        first = asyncio.Event()

        async def hold() -> None:
            async for event in engine.submit(Request("held", tuple(prompt_ids), params, lora="all-r8")):
                held.extend(event.token_ids)
                first.set()

        holding = asyncio.create_task(hold())
        await asyncio.wait_for(first.wait(), 60)
        (qv,) = await _generate(engine, [Request("qv", tuple(prompt_ids), _short(), lora="qv-r4")])
        engine.remove_lora("qv-r4")
        engine.add_lora(by_name["mlp-r16"])
        (mlp,) = await _generate(engine, [Request("mlp", tuple(prompt_ids), _short(), lora="mlp-r16")])
        assert len(held) < ENGINE_HOLD_TOKENS, "the held stream was still running"
        await asyncio.wait_for(holding, 120)
    finally:
        engine.shutdown()
    assert qv == _merged_greedy(model_dirs["llama"], adapters["qv-r4"], prompt_ids)
    assert mlp == _merged_greedy(model_dirs["llama"], adapters["mlp-r16"], prompt_ids)
    assert held == long_expected


def _short() -> SamplingParams:
    return SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize(
    ("route", "body", "status", "says"),
    [
        ("/v1/load_lora_adapter", {"lora_name": "all-r8", "lora_path": "/nowhere"}, 400, "already loaded"),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere"}, 400, "no adapter_config.json"),
        ("/v1/load_lora_adapter", {"lora_name": "", "lora_path": "/nowhere"}, 400, "must be 1 to 128"),
        ("/v1/unload_lora_adapter", {"lora_name": "never-loaded"}, 404, "no LoRA adapter is loaded"),
    ],
)
def test_what_cannot_be_loaded_or_unloaded_is_refused_saying_why(
    lora_server: ServerProcess, route: str, body: dict[str, str], status: int, says: str
) -> None:
    with _http(lora_server) as http:
        answer = http.post(route, json=body)
    assert answer.status_code == status and says in answer.json()["error"]["message"], answer.text


def test_a_rank_over_the_limit_is_refused_at_load(lora_server: ServerProcess, adapters: dict[str, Path]) -> None:
    with _http(lora_server) as http:
        answer = http.post("/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": str(adapters["mlp-r16"])})
    assert answer.status_code == 200  # 16 is the default --max-lora-rank
    with _http(lora_server) as http:
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "big"}).status_code == 200


def test_a_server_without_lora_refuses_to_load_one(llama_server: ServerProcess, adapters: dict[str, Path]) -> None:
    with _http(llama_server) as http:
        answer = http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(adapters["qv-r4"])})
    assert answer.status_code == 400 and "--enable-lora" in answer.json()["error"]["message"]


def test_modelserve_v1_names_the_adapter_per_request_and_loads_and_unloads_them(
    lora_server: ServerProcess, adapters: dict[str, Path], expected: dict[str, list[int]]
) -> None:
    """GenerateRequest.adapter (and a BatchGenerate item's), ModelInfo's adapters, Load/UnloadLoraAdapter."""
    params = pb.GenerationParameters(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    with lora_server.channel() as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        def ids(adapter: str) -> list[int]:
            request = pb.GenerateRequest(prompt=PROMPT, params=params, adapter=adapter)
            return [t for m in stub.Generate(request, timeout=60) for t in m.token_ids]

        info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=60)
        assert {a.name: a.rank for a in info.adapters} == {"all-r8": 8, "qv-r4": 4}
        assert list(next(a for a in info.adapters if a.name == "qv-r4").modules) == ["q_proj", "v_proj"]
        assert ids("") == ids(info.model_id) == expected[""]
        assert ids("all-r8") == expected["all-r8"]
        with ModelServeClient(lora_server.address, timeout_s=60) as client:  # the SDK's keyword
            streamed = client.stream(PROMPT, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, adapter="qv-r4")
            assert [t for m in streamed for t in m.token_ids] == expected["qv-r4"]
        loaded = stub.LoadLoraAdapter(pb.LoadLoraAdapterRequest(name="mlp", path=str(adapters["mlp-r16"])), timeout=60)
        assert loaded.adapter.rank == 16 and list(loaded.adapter.modules) == ["gate_proj", "up_proj", "down_proj"]
        assert ids("mlp") == expected["mlp-r16"]
        batch = stub.BatchGenerate(
            pb.BatchGenerateRequest(
                requests=[
                    pb.GenerateRequest(prompt=PROMPT, params=params, adapter="qv-r4"),
                    pb.GenerateRequest(prompt=PROMPT, params=params, adapter="nope"),
                ]
            ),
            timeout=60,
        )
        first, second = batch.items
        assert list(first.result.token_ids) == expected["qv-r4"]
        assert second.error.code == grpc.StatusCode.NOT_FOUND.value[0]
        assert "requests[1].adapter" in second.error.message, second.error.message
        stub.UnloadLoraAdapter(pb.UnloadLoraAdapterRequest(name="mlp"), timeout=60)
        for call, code in [
            (lambda: ids("mlp"), grpc.StatusCode.NOT_FOUND),
            (
                lambda: stub.UnloadLoraAdapter(pb.UnloadLoraAdapterRequest(name="mlp"), timeout=60),
                grpc.StatusCode.NOT_FOUND,
            ),
            (
                lambda: stub.LoadLoraAdapter(pb.LoadLoraAdapterRequest(name="qv-r4", path="/x"), timeout=60),
                grpc.StatusCode.ALREADY_EXISTS,
            ),
        ]:
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() is code, refused.value


def test_a_model_off_the_llama_forward_cannot_take_adapters(model_dirs: dict[str, Path]) -> None:
    gpt2 = load_model(str(model_dirs["gpt2"]), torch.device("cpu"), torch.float32)
    assert gpt2.lora is None  # the frontend's view: no adapter can fit it
    config = EngineConfig(max_batch_size=2, kv_cache_bytes=8 << 20, enable_lora=True)
    with pytest.raises(ValueError, match="LoRA adapters need modelserve's own Llama-family forward; GPT2LMHeadModel"):
        Engine(gpt2.model, gpt2.tokenizer, gpt2.eos_token_ids, config, gpt2.max_sequence_length)
