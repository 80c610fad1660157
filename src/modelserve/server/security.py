"""Transport security and caller authentication: TLS, mutual TLS, bearer tokens.

Owns three things, all read from the Config once at start-up:
- `server_credentials()`: the tls_* files into grpc.ServerCredentials (None = plain text);
  a client CA turns on mutual TLS, where grpc itself refuses a caller without a
  certificate signed by that CA before any handler runs.
- `resolve_token()`: the bearer token from auth_token or auth_token_file.
- `BearerTokenInterceptor`: checks `authorization: Bearer <token>` on every call; the
  HTTP app checks its Authorization header with the same `bearer_refusal`.

The interceptor is hand-written because grpc has no server-side token check:
grpc.access_token_call_credentials and grpc.AuthMetadataPlugin are client-side only.
Every misconfiguration is a ValueError naming the flag, so the server can refuse to
start with a line that says what to fix.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from modelserve.config import Config

#: Methods a probe or a tool must reach without a token (unless auth_health): standard
#: health (Kubernetes grpc probes cannot send metadata) and server reflection.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
EXPECTED_METADATA = "'authorization: Bearer <token>' metadata"


def _read(path: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from exc
    if not data.strip():
        raise ValueError(f"{flag}: {path} is empty")
    return data


def tls_enabled(config: Config) -> bool:
    return bool(config.tls_cert_file or config.tls_key_file)


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """TLS credentials for the listening port, or None for plain text."""
    cert, key, client_ca = config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file
    if not cert and not key:
        if client_ca:
            raise ValueError("--tls-client-ca-file needs --tls-cert-file and --tls-key-file (mutual TLS is TLS)")
        return None
    if not cert:
        raise ValueError("--tls-key-file is set but --tls-cert-file is not: TLS needs both")
    if not key:
        raise ValueError("--tls-cert-file is set but --tls-key-file is not: TLS needs both")
    pair = (_read(key, "--tls-key-file"), _read(cert, "--tls-cert-file"))
    if not client_ca:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=_read(client_ca, "--tls-client-ca-file"), require_client_auth=True
    )


def resolve_token(config: Config) -> str | None:
    """The bearer token callers must send, or None when token auth is off."""
    if config.auth_token and config.auth_token_file:
        raise ValueError("set only one of --auth-token (MODELSERVE_AUTH_TOKEN) and --auth-token-file")
    if config.auth_token_file:
        lines = _read(config.auth_token_file, "--auth-token-file").decode("utf-8", errors="replace").splitlines()
        token, flag = (lines[0].strip() if lines else ""), "--auth-token-file"
        if not token:
            raise ValueError(f"--auth-token-file: the first line of {config.auth_token_file} is empty")
    elif config.auth_token:
        token, flag = config.auth_token.strip(), "--auth-token (MODELSERVE_AUTH_TOKEN)"
        if not token:
            raise ValueError(f"{flag} is blank")
    else:
        return None
    # gRPC metadata values are printable ASCII: a client could never send anything else.
    if not all(" " <= ch <= "~" for ch in token):
        raise ValueError(f"{flag}: the token must be printable ASCII (gRPC metadata cannot carry anything else)")
    return token


def _presented_token(metadata: Sequence[tuple[str, Any]] | None) -> bytes | None:
    """The token after 'Bearer ' in the first authorization entry, as bytes; None if absent."""
    for key, value in metadata or ():
        if key != "authorization":
            continue
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8", errors="surrogatepass")
        scheme, _, token = raw.strip().partition(b" ")
        if scheme.lower() != b"bearer":  # RFC 7235: the scheme is case-insensitive
            return None
        return token.strip()
    return None


def bearer_refusal(metadata: Sequence[tuple[str, Any]] | None, expected: str, expected_how: str) -> str | None:
    """Why a caller is refused (None: it sent `expected`), saying what is expected (`expected_how`) and
    never echoing what was sent; gRPC metadata and HTTP headers alike, as (lower-case name, value) pairs."""
    presented = _presented_token(metadata)
    if presented is not None and hmac.compare_digest(presented, expected.encode("utf-8")):
        return None
    if presented is None:
        return f"missing bearer token: this server requires {expected_how}"
    return f"invalid bearer token: this server requires {expected_how} with its configured token"


def _rejecting(handler: grpc.RpcMethodHandler[Any, Any], details: str) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as `handler` that ends the call UNAUTHENTICATED.

    It takes no request deserializer on purpose: an unauthenticated caller's
    messages are never parsed.
    """

    async def reject(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

    async def reject_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, details)
        yield  # an async generator, as wrapping interceptors expect of a response stream

    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(reject, response_serializer=serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(reject_stream, response_serializer=serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(reject, response_serializer=serializer)
    return grpc.stream_stream_rpc_method_handler(reject_stream, response_serializer=serializer)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without `authorization: Bearer <token>` (UNAUTHENTICATED).

    Put it after the telemetry interceptors (the first in grpc's list is the
    outermost): a refused call then still shows in spans and rpc.server.call.duration.
    """

    def __init__(self, token: str, *, open_method_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES) -> None:
        if not token:
            raise ValueError("BearerTokenInterceptor needs a non-empty token")
        self._expected = token
        self._open = open_method_prefixes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = details.method.decode() if isinstance(details.method, bytes) else str(details.method)
        if method.startswith(self._open):
            return await continuation(details)
        message = bearer_refusal(details.invocation_metadata, self._expected, EXPECTED_METADATA)
        if message is None:
            return await continuation(details)
        handler = await continuation(details)
        # An unknown method stays UNIMPLEMENTED: refusing it here would let any caller add
        # rpc.method values to the metrics (and reflection lists the methods anyway).
        return None if handler is None else _rejecting(handler, message)
