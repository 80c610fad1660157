"""Sync and asyncio clients. `generate()` yields text deltas; `stream()` yields the
full GenerateResponse messages (token ids, logprobs, finish reason, usage)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

import grpc

from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
Params = pb.GenerationParameters | Mapping[str, Any] | None


def generation_parameters(params: Params = None, **overrides: Any) -> pb.GenerationParameters:
    """Build GenerationParameters from a message, a dict, keyword arguments, or a mix."""
    message = pb.GenerationParameters()
    if isinstance(params, pb.GenerationParameters):
        message.CopyFrom(params)
    elif params:
        overrides = {**params, **overrides}
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            getattr(message, key).extend(value)
        else:
            setattr(message, key, value)
    return message


def _request(prompt: str, params: Params, request_id: str, overrides: dict[str, Any]) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, params=generation_parameters(params, **overrides), request_id=request_id)


def _batch(items: Iterable[str | tuple[str, Params]]) -> pb.BatchGenerateRequest:
    requests = []
    for item in items:
        prompt, params = (item, None) if isinstance(item, str) else item
        requests.append(_request(prompt, params, "", {}))
    return pb.BatchGenerateRequest(requests=requests)


class ModelServeClient:
    """Blocking client. Use as a context manager, or call close()."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        channel: grpc.Channel | None = None,
        timeout_s: float | None = None,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> None:
        self._channel = channel or grpc.insecure_channel(address)
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self._timeout_s = timeout_s
        self._metadata = tuple(metadata)

    def __enter__(self) -> ModelServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def stream(
        self, prompt: str, params: Params = None, *, request_id: str = "", **overrides: Any
    ) -> Iterator[pb.GenerateResponse]:
        """Every GenerateResponse of the stream. Closing the iterator cancels the call."""
        call = self._stub.Generate(
            _request(prompt, params, request_id, overrides), timeout=self._timeout_s, metadata=self._metadata
        )
        try:
            yield from call
        finally:
            call.cancel()

    def generate(self, prompt: str, params: Params = None, **overrides: Any) -> Iterator[str]:
        """The output's text deltas, as they arrive."""
        for message in self.stream(prompt, params, **overrides):
            if message.text:
                yield message.text

    def complete(self, prompt: str, params: Params = None, **overrides: Any) -> str:
        """The whole output text."""
        return "".join(self.generate(prompt, params, **overrides))

    def batch_generate(self, items: Iterable[str | tuple[str, Params]]) -> list[pb.BatchItem]:
        """Results in request order; each item holds `result` or `error`."""
        return list(self._stub.BatchGenerate(_batch(items), timeout=self._timeout_s, metadata=self._metadata).items)

    def tokenize(
        self, text: str, *, add_special_tokens: bool = True, return_tokens: bool = False
    ) -> pb.TokenizeResponse:
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens, return_tokens=return_tokens)
        response: pb.TokenizeResponse = self._stub.Tokenize(request, timeout=self._timeout_s, metadata=self._metadata)
        return response

    def model_info(self) -> pb.ModelInfoResponse:
        response: pb.ModelInfoResponse = self._stub.ModelInfo(
            pb.ModelInfoRequest(), timeout=self._timeout_s, metadata=self._metadata
        )
        return response

    def health(self) -> pb.HealthResponse:
        response: pb.HealthResponse = self._stub.Health(
            pb.HealthRequest(), timeout=self._timeout_s, metadata=self._metadata
        )
        return response


class AsyncModelServeClient:
    """asyncio client. Use with `async with`, or await close()."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        channel: grpc.aio.Channel | None = None,
        timeout_s: float | None = None,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> None:
        self._channel = channel or grpc.aio.insecure_channel(address)
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self._timeout_s = timeout_s
        self._metadata = tuple(metadata)

    async def __aenter__(self) -> AsyncModelServeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def stream(
        self, prompt: str, params: Params = None, *, request_id: str = "", **overrides: Any
    ) -> AsyncIterator[pb.GenerateResponse]:
        call = self._stub.Generate(
            _request(prompt, params, request_id, overrides), timeout=self._timeout_s, metadata=self._metadata
        )
        try:
            async for message in call:
                yield message
        finally:
            call.cancel()

    async def generate(self, prompt: str, params: Params = None, **overrides: Any) -> AsyncIterator[str]:
        async for message in self.stream(prompt, params, **overrides):
            if message.text:
                yield message.text

    async def complete(self, prompt: str, params: Params = None, **overrides: Any) -> str:
        return "".join([t async for t in self.generate(prompt, params, **overrides)])

    async def batch_generate(self, items: Iterable[str | tuple[str, Params]]) -> list[pb.BatchItem]:
        response = await self._stub.BatchGenerate(_batch(items), timeout=self._timeout_s, metadata=self._metadata)
        return list(response.items)

    async def tokenize(
        self, text: str, *, add_special_tokens: bool = True, return_tokens: bool = False
    ) -> pb.TokenizeResponse:
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens, return_tokens=return_tokens)
        response: pb.TokenizeResponse = await self._stub.Tokenize(
            request, timeout=self._timeout_s, metadata=self._metadata
        )
        return response

    async def model_info(self) -> pb.ModelInfoResponse:
        response: pb.ModelInfoResponse = await self._stub.ModelInfo(
            pb.ModelInfoRequest(), timeout=self._timeout_s, metadata=self._metadata
        )
        return response

    async def health(self) -> pb.HealthResponse:
        response: pb.HealthResponse = await self._stub.Health(
            pb.HealthRequest(), timeout=self._timeout_s, metadata=self._metadata
        )
        return response
