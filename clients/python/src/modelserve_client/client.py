"""Sync and asyncio clients. `generate()` yields text deltas; `stream()` yields the
full GenerateResponse messages (token ids, logprobs, finish reason, usage).
`chat()` and `stream_chat()` do the same for the next assistant reply of a
conversation, which the server lays out with the model's chat template.

Security: `tls=True` (or any `tls_*` argument) opens a TLS channel; `tls_cert` and
`tls_key` add a client certificate for mutual TLS. `token` is sent as
`authorization: Bearer <token>` on every call: as grpc call credentials on a TLS
channel this client opens (grpc then never sends it in clear text), and as plain
call metadata otherwise, since grpc refuses call credentials on insecure channels.

Retries: a call the server refused before answering (RESOURCE_EXHAUSTED from a full
queue, UNAVAILABLE from a server that is starting or draining) is retried by grpc
itself, up to `max_attempts` in all, waiting what the server's `grpc-retry-pushback-ms`
trailer asks. A stream that has received a message is never retried, so no output is
ever repeated. Over many replicas a retry goes to the next one in the rotation.

Many replicas: `address` is a gRPC target (`host:port`, `dns:///name:port`, `ipv4:a:p,b:p`)
or several IP addresses with ports (a list, or one string with commas). Calls are spread
over every address the target resolves to by gRPC's round_robin; with `health_check` (the
default for a target that may name several replicas: a list, `ipv4:`/`ipv6:` with commas, or
`dns:`) the channel also watches each replica's grpc.health.v1 status (gRPC A17), so a
replica that is loading, draining or has lost its engine leaves the rotation the moment it
says NOT_SERVING and comes back when it says SERVING. One `host:port` is not health-checked
by default: with no other replica to go to, a call should reach the server and get its own
answer ("the model is still loading; retry when …"), not gRPC's "backend unhealthy". A
dns:/// name (a Kubernetes headless Service) is resolved again whenever a connection closes,
which the server's --max-connection-age-s makes happen every few minutes: new pods are found
that way.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import threading
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import grpc

from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_MAX_ATTEMPTS = 3
Params = pb.GenerationParameters | Mapping[str, Any] | None
#: A chat message: a ChatMessage, or a mapping with "role" and "content" (the shape OpenAI's API uses).
Message: TypeAlias = pb.ChatMessage | Mapping[str, str]
#: PEM data as bytes, or the path of a PEM file.
PemSource: TypeAlias = bytes | str | os.PathLike[str]
#: A gRPC target, or several IP addresses with ports (see channel_target()).
Address: TypeAlias = str | Sequence[str]
#: The grpc.health.v1 name the channel watches on each replica: the one the server's readiness answers for.
HEALTH_SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
# gRPC's name resolvers: a target that starts with one of these is passed on as it is.
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def _pem(source: PemSource | None, name: str) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise ValueError(f"{name}: cannot read {source}: {exc.strerror or exc}") from exc


def channel_credentials(
    *,
    tls_ca: PemSource | None = None,
    tls_cert: PemSource | None = None,
    tls_key: PemSource | None = None,
    token: str | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials (the system's roots unless `tls_ca`), with the token if given."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together (a client certificate needs its key)")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_pem(tls_ca, "tls_ca"),
        private_key=_pem(tls_key, "tls_key"),
        certificate_chain=_pem(tls_cert, "tls_cert"),
    )
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return credentials


def retry_service_config(max_attempts: int) -> str:
    """gRPC service config: retry refused GenerationService calls (max_attempts 1 = never)."""
    if not 1 <= max_attempts <= 5:
        raise ValueError(f"max_attempts must be in [1, 5] (gRPC's own limit), got {max_attempts}")
    policy = {
        "maxAttempts": max_attempts,
        "initialBackoff": "0.1s",
        "maxBackoff": "5s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["RESOURCE_EXHAUSTED", "UNAVAILABLE"],
    }
    config: dict[str, Any] = {"methodConfig": [{"name": [{"service": "modelserve.v1.GenerationService"}]}]}
    if max_attempts > 1:
        config["methodConfig"][0]["retryPolicy"] = policy
    return json.dumps(config)


def service_config(max_attempts: int = DEFAULT_MAX_ATTEMPTS, *, health_check: bool = True) -> str:
    """gRPC service config: retry_service_config's retries, calls spread over every address the target
    resolves to (round_robin) and, with `health_check`, only over replicas whose grpc.health.v1 Watch
    says SERVING (gRPC A17)."""
    config = json.loads(retry_service_config(max_attempts))
    config["loadBalancingConfig"] = [{"round_robin": {}}]
    if health_check:
        config["healthCheckConfig"] = {"serviceName": HEALTH_SERVICE_NAME}
    return json.dumps(config)


def _spreads(address: Address) -> bool:
    """Whether `address` may name several replicas (so calls are spread, and health-checked by default)."""
    target = channel_target(address)
    return target.startswith("dns:") or "," in target


def channel_target(address: Address) -> str:
    """The gRPC target for `address`: a target as it is (`host:port`, `dns:///name:port`, `ipv4:a:p,b:p`),
    or several IP addresses with ports (a sequence, or one string with commas) as gRPC's multi-address
    target, `ipv4:` or `ipv6:`. gRPC has no target for a list of host names: give one dns:/// name
    that resolves to them all."""
    if isinstance(address, str):
        if address.startswith(_SCHEMES) or "," not in address:
            return address
        address = address.split(",")
    items = [item.strip() for item in address]
    if not items:
        raise ValueError("no address given")
    if len(items) == 1:
        return items[0]
    versions = {_ip_version(item) for item in items}
    if len(versions) > 1:
        raise ValueError(f"a list of addresses takes IPv4 or IPv6 ones, not both: {', '.join(items)}")
    return f"ipv{versions.pop()}:" + ",".join(items)


def _ip_version(address: str) -> int:
    """4 for `a.b.c.d:port`, 6 for `[v6]:port` (gRPC's spelling); ValueError for anything else."""
    host, _, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(
            host[1:-1] if bracketed else host
        )
    except ValueError:
        ip = None
    if ip is None or not port.isdigit() or bracketed != (ip.version == 6):
        raise ValueError(
            f"{address!r}: a list of addresses takes IP addresses with ports (10.0.0.7:50051, [fd00::7]:50051); "
            "for host names give one dns:///NAME:PORT target that resolves to them all"
        )
    return ip.version


class _Connection:
    """What both clients decide the same way: TLS or not, and where the token goes."""

    def __init__(
        self,
        channel_given: bool,
        metadata: Iterable[tuple[str, str]],
        tls: bool,
        tls_ca: PemSource | None,
        tls_cert: PemSource | None,
        tls_key: PemSource | None,
        tls_server_name: str | None,
        token: str | None,
        max_attempts: int,
        health_check: bool,
    ) -> None:
        uses_tls = tls or any(x is not None for x in (tls_ca, tls_cert, tls_key, tls_server_name))
        if channel_given and uses_tls:
            raise ValueError("pass either channel or TLS settings, not both (the channel has its own credentials)")
        self.metadata = tuple(metadata)
        self.credentials: grpc.ChannelCredentials | None = None
        self.options: list[tuple[str, Any]] = [
            ("grpc.service_config", service_config(max_attempts, health_check=health_check))
        ]
        if uses_tls:
            self.credentials = channel_credentials(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token)
            if tls_server_name:
                self.options.append(("grpc.ssl_target_name_override", tls_server_name))
        elif token:
            self.metadata += (("authorization", f"Bearer {token}"),)


#: The keyword arguments `generation_parameters()` accepts: the fields of GenerationParameters.
PARAMETER_NAMES: tuple[str, ...] = tuple(f.name for f in pb.GenerationParameters.DESCRIPTOR.fields)
#: The request's own fields (GenerateRequest's and ChatRequest's) that `stream()`, `generate()`, `complete()`
#: and the chat methods also accept as keywords.
REQUEST_NAMES: tuple[str, ...] = ("priority", "request_id", "adapter")
_MAPS = frozenset(
    f.name
    for f in pb.GenerationParameters.DESCRIPTOR.fields
    if f.message_type and f.message_type.GetOptions().map_entry
)
_REPEATED = frozenset(f.name for f in pb.GenerationParameters.DESCRIPTOR.fields if f.is_repeated) - _MAPS


def _check_names(given: Iterable[str], accepted: Iterable[str], where: str) -> None:
    """TypeError, as for a misspelt keyword argument, naming every keyword `where` accepts."""
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise TypeError(
            f"{where} got unexpected keyword argument(s) {names}; it accepts: " + ", ".join(sorted(accepted))
        )


def generation_parameters(params: Params = None, **overrides: Any) -> pb.GenerationParameters:
    """Build GenerationParameters from a message, a dict, keyword arguments, or a mix.

    Keys are the fields of GenerationParameters (PARAMETER_NAMES); any other raises TypeError.
    A repeated field (`stop`, `stop_token_ids`) takes one value or an iterable of them: a str
    is one stop sequence, never its characters. A map (`logit_bias`) takes a dict. None leaves a
    field unset.
    """
    message = pb.GenerationParameters()
    if isinstance(params, pb.GenerationParameters):
        message.CopyFrom(params)
    elif params:
        overrides = {**params, **overrides}
    _check_names(overrides, PARAMETER_NAMES, "generation_parameters()")
    for key, value in overrides.items():
        if value is None:
            continue
        if key in _MAPS:
            getattr(message, key).update(value)
        elif key in _REPEATED:
            getattr(message, key).extend(_as_list(value))
        else:
            setattr(message, key, value)
    return message


def _as_list(value: Any) -> list[Any]:
    """One value or an iterable of them; str and bytes count as one value."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def _request_fields(params: Params, request_id: str, overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The one place both clients turn keywords into a request's fields (raising TypeError for an
    unknown keyword before any call starts). `priority`, `request_id` and `adapter` (a LoRA adapter's name),
    as keywords or keys of a dict `params`, are the request's own fields; the rest are GenerationParameters."""
    if params is not None and not isinstance(params, pb.GenerationParameters):
        overrides, params = {**params, **overrides}, None
    _check_names(overrides, PARAMETER_NAMES + REQUEST_NAMES, where)
    overrides = dict(overrides)
    priority = int(overrides.pop("priority", None) or 0)
    request_id = overrides.pop("request_id", None) or request_id
    adapter = str(overrides.pop("adapter", None) or "")
    return dict(
        params=generation_parameters(params, **overrides), request_id=request_id, priority=priority, adapter=adapter
    )


def _request(prompt: str, params: Params, request_id: str, overrides: Mapping[str, Any]) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, **_request_fields(params, request_id, overrides, "a Generate request"))


def _chat_request(
    messages: Iterable[Message], params: Params, request_id: str, overrides: Mapping[str, Any]
) -> pb.ChatRequest:
    fields = _request_fields(params, request_id, overrides, "a Chat request")
    return pb.ChatRequest(messages=[_chat_message(m) for m in messages], **fields)


def _chat_message(message: Message) -> pb.ChatMessage:
    if isinstance(message, pb.ChatMessage):
        return message
    try:
        return pb.ChatMessage(role=message["role"], content=message["content"])
    except (KeyError, TypeError):
        raise TypeError(
            f"a chat message is a ChatMessage or a mapping with 'role' and 'content', got {message!r}"
        ) from None


class Stream(Iterator[pb.GenerateResponse]):
    """One streaming call's GenerateResponse messages. The call starts at the first next(), so a Stream made
    and dropped sends nothing. `cancel()` (or `close()`, or leaving a `with` block) cancels the call, from any
    thread: the stream then ends as if it were done, a next() waiting in another thread included. That is how
    an interactive caller stops a reply: one thread reads the stream, another cancels it. (Raising
    KeyboardInterrupt into a thread blocked inside grpc's iterator can leave grpc's lock half released, grpc
    issue #19973; a cancel from another thread never does.)"""

    def __init__(self, start: Callable[[], Any]) -> None:
        self._start: Callable[[], Any] | None = start
        self._call: Any = None
        self._cancelled = False
        self._lock = threading.Lock()

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> pb.GenerateResponse:
        with self._lock:
            if self._cancelled:
                raise StopIteration
            if self._call is None:
                assert self._start is not None
                self._call, self._start = self._start(), None
            call = self._call
        try:
            message: pb.GenerateResponse = next(call)
        except grpc.RpcError:
            if self._cancelled:  # our own cancel, not the server's status
                raise StopIteration from None
            raise
        return message

    def cancel(self) -> None:
        """Cancel the call (a no-op once it has ended); the stream ends."""
        with self._lock:
            self._cancelled = True
            call = self._call
        if call is not None:
            call.cancel()

    close = cancel

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    @property
    def cancelled(self) -> bool:
        """Whether cancel() or close() was called."""
        return self._cancelled


Sampled = TypeVar("Sampled", pb.GenerateRequest, pb.ChatRequest)


def _one_sample(request: Sampled) -> Sampled:
    """The text helpers join one stream's deltas: n samples' messages interleave (read them with stream())."""
    if request.params.n > 1:
        raise ValueError(
            f"params.n is {request.params.n}: this method returns one text; use stream() (or stream_chat()) "
            "and each message's index for n samples"
        )
    return request


def _texts(messages: Stream) -> Generator[str]:
    """The text deltas of a stream; closing this closes (cancels) the stream."""
    with contextlib.closing(messages):
        for message in messages:
            if message.text:
                yield message.text


async def _async_texts(messages: AsyncGenerator[pb.GenerateResponse]) -> AsyncGenerator[str]:
    """The text deltas of a stream; closing this closes (cancels) the stream."""
    async with contextlib.aclosing(messages):
        async for message in messages:
            if message.text:
                yield message.text


def _batch(items: Iterable[str | tuple[str, Params]]) -> pb.BatchGenerateRequest:
    requests = []
    for item in items:
        prompt, params = (item, None) if isinstance(item, str) else item
        requests.append(_request(prompt, params, "", {}))
    return pb.BatchGenerateRequest(requests=requests)


class ModelServeClient:
    """Blocking client. Use as a context manager, or call close().

    TLS and token: see the module docstring; `tls_ca`, `tls_cert` and `tls_key` take
    PEM bytes or a file path, `tls_server_name` overrides the name the server's
    certificate is checked against (needed with a list of IP addresses).

    `address` and `health_check`: see the module docstring. `health_check=False` sends
    calls to a replica whatever its health says: to ask a loading or draining server for
    its health(), or when the server's grpc.health.v1 needs the token (--auth-health) and
    the channel has no TLS (the watch carries no call metadata, only call credentials).
    """

    def __init__(
        self,
        address: Address = DEFAULT_ADDRESS,
        *,
        channel: grpc.Channel | None = None,
        timeout_s: float | None = None,
        metadata: Iterable[tuple[str, str]] = (),
        tls: bool = False,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        health_check: bool | None = None,
    ) -> None:
        conn = _Connection(
            channel is not None,
            metadata,
            tls,
            tls_ca,
            tls_cert,
            tls_key,
            tls_server_name,
            token,
            max_attempts,
            _spreads(address) if health_check is None else health_check,
        )
        if channel is None:
            target = channel_target(address)
            if conn.credentials is None:
                channel = grpc.insecure_channel(target, options=conn.options)
            else:
                channel = grpc.secure_channel(target, conn.credentials, options=conn.options)
        self._channel = channel
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self._timeout_s = timeout_s
        self._metadata = conn.metadata

    def __enter__(self) -> ModelServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def channel(self) -> grpc.Channel:
        """The channel, for other stubs over the same balanced connections, or to read a call's headers
        (`modelserve-server-id` names the replica that accepted a stream)."""
        return self._channel

    def close(self) -> None:
        self._channel.close()

    def stream(self, prompt: str, params: Params = None, *, request_id: str = "", **overrides: Any) -> Stream:
        """Every GenerateResponse of the stream (see Stream: the call starts at the first next(); cancel() or
        close(), from any thread, cancels it). `overrides` are GenerationParameters fields and `priority`; any
        other keyword raises TypeError here, at once."""
        return self._stream(self._stub.Generate, _request(prompt, params, request_id, overrides))

    def _stream(self, method: Callable[..., Any], request: Any) -> Stream:
        return Stream(lambda: method(request, timeout=self._timeout_s, metadata=self._metadata))

    def generate(self, prompt: str, params: Params = None, **overrides: Any) -> Generator[str]:
        """The output's text deltas, as they arrive."""
        return _texts(self._stream(self._stub.Generate, _one_sample(_request(prompt, params, "", overrides))))

    def stream_chat(
        self, messages: Iterable[Message], params: Params = None, *, request_id: str = "", **overrides: Any
    ) -> Stream:
        """As stream(), for the next assistant reply to `messages` (oldest first); keywords as stream()."""
        return self._stream(self._stub.Chat, _chat_request(messages, params, request_id, overrides))

    def chat(self, messages: Iterable[Message], params: Params = None, **overrides: Any) -> Generator[str]:
        """The next assistant reply's text deltas, as they arrive; closing the iterator cancels the call."""
        return _texts(self._stream(self._stub.Chat, _one_sample(_chat_request(messages, params, "", overrides))))

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
        """The detailed health of one replica, the next in the rotation (with `health_check`, a SERVING one)."""
        response: pb.HealthResponse = self._stub.Health(
            pb.HealthRequest(), timeout=self._timeout_s, metadata=self._metadata
        )
        return response


class AsyncModelServeClient:
    """asyncio client. Use with `async with`, or await close()."""

    def __init__(
        self,
        address: Address = DEFAULT_ADDRESS,
        *,
        channel: grpc.aio.Channel | None = None,
        timeout_s: float | None = None,
        metadata: Iterable[tuple[str, str]] = (),
        tls: bool = False,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        health_check: bool | None = None,
    ) -> None:
        conn = _Connection(
            channel is not None,
            metadata,
            tls,
            tls_ca,
            tls_cert,
            tls_key,
            tls_server_name,
            token,
            max_attempts,
            _spreads(address) if health_check is None else health_check,
        )
        if channel is None:
            target = channel_target(address)
            if conn.credentials is None:
                channel = grpc.aio.insecure_channel(target, options=conn.options)
            else:
                channel = grpc.aio.secure_channel(target, conn.credentials, options=conn.options)
        self._channel = channel
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self._timeout_s = timeout_s
        self._metadata = conn.metadata

    async def __aenter__(self) -> AsyncModelServeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def channel(self) -> grpc.aio.Channel:
        """As ModelServeClient.channel."""
        return self._channel

    async def close(self) -> None:
        await self._channel.close()

    def stream(
        self, prompt: str, params: Params = None, *, request_id: str = "", **overrides: Any
    ) -> AsyncGenerator[pb.GenerateResponse]:
        """As ModelServeClient.stream: an unknown keyword raises TypeError here, at once."""
        return self._stream(self._stub.Generate, _request(prompt, params, request_id, overrides))

    async def _stream(self, method: Callable[..., Any], request: Any) -> AsyncGenerator[pb.GenerateResponse]:
        call = method(request, timeout=self._timeout_s, metadata=self._metadata)
        try:
            async for message in call:
                yield message
        finally:
            call.cancel()

    def generate(self, prompt: str, params: Params = None, **overrides: Any) -> AsyncGenerator[str]:
        """The output's text deltas, as they arrive."""
        return _async_texts(self._stream(self._stub.Generate, _one_sample(_request(prompt, params, "", overrides))))

    def stream_chat(
        self, messages: Iterable[Message], params: Params = None, *, request_id: str = "", **overrides: Any
    ) -> AsyncGenerator[pb.GenerateResponse]:
        """As ModelServeClient.stream_chat."""
        return self._stream(self._stub.Chat, _chat_request(messages, params, request_id, overrides))

    def chat(self, messages: Iterable[Message], params: Params = None, **overrides: Any) -> AsyncGenerator[str]:
        """The next assistant reply's text deltas, as they arrive."""
        return _async_texts(self._stream(self._stub.Chat, _one_sample(_chat_request(messages, params, "", overrides))))

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
