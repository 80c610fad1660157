"""TLS, mutual TLS and bearer-token auth, against real server processes.

The test makes its own PKI: a CA, a server certificate for 127.0.0.1/localhost,
a client certificate, and an unrelated second CA with its own client certificate.
Two servers are shared by all tests here: TLS + token, and mutual TLS + token
with --auth-health.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from modelserve_client import AsyncModelServeClient, ModelServeClient
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc

from modelserve.cli import main as cli_main
from modelserve.config import Config
from modelserve.server.security import BearerTokenInterceptor, resolve_token, server_credentials
from tests.conftest import START_TIMEOUT_S, ServerProcess, start_server

TOKEN = "s3cret-Token_0123456789"
CALL_TIMEOUT_S = 30.0
STREAM_WAIT_S = 3.0  # how long a method that streams is given to show it was let in
SERVING = health_pb2.HealthCheckResponse.SERVING


# --- the test's own PKI ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    cert_pem: bytes
    key_pem: bytes
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class Pki:
    ca: Identity
    server: Identity
    client: Identity
    other_ca: Identity
    other_client: Identity


def _identity(
    directory: Path,
    name: str,
    *,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    server: bool = False,
) -> tuple[Identity, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # cert + CRL signing
        builder = builder.add_extension(usage, critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    if server:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return Identity(cert_pem, key_pem, cert_path, key_path), cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = _identity(directory, "ca")
    server, _, _ = _identity(directory, "server", issuer=(ca_cert, ca_key), server=True)
    client, _, _ = _identity(directory, "client", issuer=(ca_cert, ca_key))
    other_ca, other_cert, other_key = _identity(directory, "other-ca")
    other_client, _, _ = _identity(directory, "other-client", issuer=(other_cert, other_key))
    return Pki(ca, server, client, other_ca, other_client)


# --- helpers ----------------------------------------------------------------------------------------------------


def _secure_channel(address: str, credentials: grpc.ChannelCredentials) -> grpc.Channel:
    options = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 200)]
    return grpc.secure_channel(address, credentials, options=options)


def _wait_serving(server: ServerProcess, credentials: grpc.ChannelCredentials, metadata: Any = None) -> None:
    """Block until a health Watch over `credentials` says SERVING (ServerProcess.wait_serving is plain text)."""
    with _secure_channel(server.address, credentials) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=START_TIMEOUT_S, wait_for_ready=True, metadata=metadata
        )
        try:
            for message in call:
                if message.status == SERVING:
                    return
        except grpc.RpcError as exc:
            raise AssertionError(f"server never became SERVING ({exc}); log:\n{server.log()}") from exc
        finally:
            call.cancel()
    raise AssertionError(f"health stream ended before SERVING; log:\n{server.log()}")


def _bearer(token: str = TOKEN) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def _generate(channel: grpc.Channel, metadata: Any = None) -> str:
    request = pb.GenerateRequest(
        prompt="Hello", params=pb.GenerationParameters(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    )
    stream = pb_grpc.GenerationServiceStub(channel).Generate(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
    return "".join(message.text for message in stream)


def _check_health(channel: grpc.Channel, metadata: Any = None) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=CALL_TIMEOUT_S)
    return int(response.status)


def _code(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    error = excinfo.value
    assert isinstance(error, grpc.Call)
    return error.code()


def _details(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> str:
    error = excinfo.value
    assert isinstance(error, grpc.Call)
    return str(error.details())


def _server_args(model_dir: Path) -> tuple[str, ...]:
    return ("--model", str(model_dir), "--max-batch-size", "4", "--grace-s", "1", "--kv-cache-bytes", str(1504 * 512))


# --- server 1: TLS + token (health and reflection open) ---------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(
    pki: Pki, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    server = start_server(
        tmp_path_factory.mktemp("tls-server"),
        *_server_args(model_dirs["llama"]),
        "--tls-cert-file",
        str(pki.server.cert_path),
        "--tls-key-file",
        str(pki.server.key_path),
        env={"MODELSERVE_AUTH_TOKEN": TOKEN},
    )
    try:
        _wait_serving(server, grpc.ssl_channel_credentials(pki.ca.cert_pem))
        yield server
    finally:
        server.terminate()


@pytest.fixture()
def tls_channel(pki: Pki, tls_server: ServerProcess) -> Iterator[grpc.Channel]:
    with _secure_channel(tls_server.address, grpc.ssl_channel_credentials(pki.ca.cert_pem)) as channel:
        yield channel


def test_tls_server_logs_its_protection_and_never_the_token(tls_server: ServerProcess) -> None:
    log = tls_server.log()
    assert "transport: TLS; bearer token required (standard health and reflection open)" in log
    assert TOKEN not in log


def test_plain_text_client_cannot_talk_to_a_tls_server(tls_server: ServerProcess) -> None:
    with grpc.insecure_channel(tls_server.address) as channel, pytest.raises(grpc.RpcError) as excinfo:
        _check_health(channel)
    assert _code(excinfo) == grpc.StatusCode.UNAVAILABLE


def test_client_that_does_not_trust_the_server_ca_fails(pki: Pki, tls_server: ServerProcess) -> None:
    credentials = grpc.ssl_channel_credentials(pki.other_ca.cert_pem)
    with _secure_channel(tls_server.address, credentials) as channel, pytest.raises(grpc.RpcError) as excinfo:
        _check_health(channel)
    assert _code(excinfo) == grpc.StatusCode.UNAVAILABLE


def test_standard_health_needs_no_token(tls_channel: grpc.Channel) -> None:
    assert _check_health(tls_channel) == SERVING


def test_missing_token_is_unauthenticated(tls_channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        _generate(tls_channel)
    assert _code(excinfo) == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in _details(excinfo)


@pytest.mark.parametrize(
    "metadata",
    [
        _bearer("not-the-token"),
        _bearer(TOKEN + "x"),
        (("authorization", TOKEN),),  # no scheme
        (("authorization", f"Basic {TOKEN}"),),
    ],
    ids=["wrong", "longer", "no-scheme", "basic"],
)
def test_wrong_token_is_unauthenticated(tls_channel: grpc.Channel, metadata: Any) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        _generate(tls_channel, metadata)
    assert _code(excinfo) == grpc.StatusCode.UNAUTHENTICATED
    assert TOKEN not in _details(excinfo)


def test_unary_methods_need_the_token_too(tls_channel: grpc.Channel) -> None:
    stub = pb_grpc.GenerationServiceStub(tls_channel)
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.ModelInfo(pb.ModelInfoRequest(), timeout=CALL_TIMEOUT_S)
    assert _code(excinfo) == grpc.StatusCode.UNAUTHENTICATED
    assert stub.ModelInfo(pb.ModelInfoRequest(), metadata=_bearer(), timeout=CALL_TIMEOUT_S).model_id


def test_every_vllm_engine_method_needs_the_token(tls_channel: grpc.Channel) -> None:
    """The vLLM-compatible service (server/grpc/vllm.py) is behind the same interceptor, every method of it."""
    stub = vpb_grpc.VllmEngineStub(tls_channel)
    methods = vpb.DESCRIPTOR.services_by_name["VllmEngine"].methods
    assert {m.name for m in methods} >= {"Generate", "Abort", "HealthCheck", "GetModelInfo", "GetLoads"}
    for method in methods:
        request = message_factory.GetMessageClass(method.input_type)()  # vLLM's or smg's common messages
        # A stream may never end by itself (SubscribeKvEvents waits for events): its deadline ends it, which is
        # an answer too; a refusal for want of the token comes at once.
        timeout_s = STREAM_WAIT_S if method.server_streaming else CALL_TIMEOUT_S
        for metadata, refused in (((), True), (_bearer(), False)):
            try:
                answer = getattr(stub, method.name)(request, metadata=metadata, timeout=timeout_s)
                if method.server_streaming:
                    list(answer)  # a stream's status comes at its end
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
            # With the token: answered (an empty Generate or an Embed is refused, but not for want of it).
            assert (code == grpc.StatusCode.UNAUTHENTICATED) == refused, (method.name, metadata, code)


def test_right_token_streams_text(tls_channel: grpc.Channel) -> None:
    assert _generate(tls_channel, _bearer())
    lower_scheme = (("authorization", f"bearer {TOKEN}"),)  # the scheme is case-insensitive
    assert _generate(tls_channel, lower_scheme)


def test_refused_calls_show_in_rpc_metrics(tls_server: ServerProcess, tls_channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError):
        _generate(tls_channel)
    url = f"http://127.0.0.1:{tls_server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    samples = families["rpc_server_call_duration_seconds"].samples
    refused = [
        s
        for s in samples
        if s.name == "rpc_server_call_duration_seconds_count"
        and s.labels.get("rpc_method") == "modelserve.v1.GenerationService/Generate"
        and s.labels.get("rpc_status_code") == "UNAUTHENTICATED"
    ]
    assert refused and refused[0].value >= 1


def test_client_sdk_with_tls_and_token(pki: Pki, tls_server: ServerProcess) -> None:
    with ModelServeClient(tls_server.address, tls_ca=pki.ca.cert_path, token=TOKEN, timeout_s=CALL_TIMEOUT_S) as c:
        assert c.complete("Hello", max_new_tokens=4, temperature=0.0, ignore_eos=True)
        assert c.model_info().model_id
    with (
        ModelServeClient(tls_server.address, tls_ca=pki.ca.cert_pem, timeout_s=CALL_TIMEOUT_S) as c,
        pytest.raises(grpc.RpcError) as excinfo,
    ):
        c.model_info()
    assert _code(excinfo) == grpc.StatusCode.UNAUTHENTICATED

    async def call_async() -> str:
        async with AsyncModelServeClient(
            tls_server.address, tls_ca=pki.ca.cert_pem, token=TOKEN, timeout_s=CALL_TIMEOUT_S
        ) as client:
            return await client.complete("Hello", max_new_tokens=4, temperature=0.0, ignore_eos=True)

    assert asyncio.run(call_async())


def test_client_cli_with_tls_and_token_from_env(pki: Pki, tls_server: ServerProcess) -> None:
    command = [sys.executable, "-m", "modelserve_client.cli", "--address", tls_server.address]
    command += ["--tls-ca", str(pki.ca.cert_path), "--timeout", str(CALL_TIMEOUT_S), "info", "--json"]
    ok = subprocess.run(
        command, env={"MODELSERVE_AUTH_TOKEN": TOKEN}, capture_output=True, text=True, timeout=60, check=False
    )
    assert ok.returncode == 0, ok.stderr
    assert '"modelId"' in ok.stdout
    refused = subprocess.run(command, env={}, capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


def test_http_port_speaks_tls_with_the_grpc_certificate(pki: Pki, tls_server: ServerProcess) -> None:
    """The token must not cross the HTTP port in clear text when the operator set TLS up for gRPC."""
    url = f"https://localhost:{tls_server.http_port}"
    trust = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
    with httpx.Client(verify=trust, timeout=CALL_TIMEOUT_S) as client:
        assert client.get(f"{url}/health").status_code == 200  # open, as standard health is
        assert client.get(f"{url}/v1/models").status_code == 401
        assert client.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        # Loading and unloading LoRA adapters are guarded by the token too (before anything else is checked).
        for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            assert client.post(f"{url}{route}", json={"lora_name": "a", "lora_path": "/x"}).status_code == 401
    with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port
        httpx.get(f"http://127.0.0.1:{tls_server.http_port}/health", timeout=CALL_TIMEOUT_S)


# --- server 2: mutual TLS + token, also on health (--auth-health) -----------------------------------------------


def _mtls_credentials(pki: Pki, client: Identity | None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(pki.ca.cert_pem)
    return grpc.ssl_channel_credentials(pki.ca.cert_pem, client.key_pem, client.cert_pem)


@pytest.fixture(scope="module")
def mtls_server(
    pki: Pki, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("mtls-server")
    token_file = directory / "token"
    token_file.write_text(f"  {TOKEN}  \nignored second line\n")
    server = start_server(
        directory,
        *_server_args(model_dirs["llama"]),
        "--no-telemetry",  # the token check must not depend on the telemetry interceptors
        "--tls-cert-file",
        str(pki.server.cert_path),
        "--tls-key-file",
        str(pki.server.key_path),
        "--tls-client-ca-file",
        str(pki.ca.cert_path),
        "--auth-token-file",
        str(token_file),
        "--auth-health",
    )
    try:
        _wait_serving(server, _mtls_credentials(pki, pki.client), metadata=_bearer())
        yield server
    finally:
        server.terminate()


def test_mtls_server_logs_its_protection(mtls_server: ServerProcess) -> None:
    log = mtls_server.log()
    assert "transport: mutual TLS" in log and "bearer token required on every method" in log
    assert TOKEN not in log


def test_mtls_with_the_right_client_certificate(pki: Pki, mtls_server: ServerProcess) -> None:
    with _secure_channel(mtls_server.address, _mtls_credentials(pki, pki.client)) as channel:
        assert _generate(channel, _bearer())


@pytest.mark.parametrize("client", ["none", "other-ca"])
def test_mtls_refuses_clients_without_a_trusted_certificate(pki: Pki, mtls_server: ServerProcess, client: str) -> None:
    identity = None if client == "none" else pki.other_client
    with (
        _secure_channel(mtls_server.address, _mtls_credentials(pki, identity)) as channel,
        pytest.raises(grpc.RpcError) as excinfo,
    ):
        _check_health(channel, _bearer())
    assert _code(excinfo) == grpc.StatusCode.UNAVAILABLE


def test_auth_health_requires_the_token_on_standard_health(pki: Pki, mtls_server: ServerProcess) -> None:
    with _secure_channel(mtls_server.address, _mtls_credentials(pki, pki.client)) as channel:
        with pytest.raises(grpc.RpcError) as excinfo:
            _check_health(channel)
        assert _code(excinfo) == grpc.StatusCode.UNAUTHENTICATED
        assert _check_health(channel, _bearer()) == SERVING


def test_client_sdk_with_mtls(pki: Pki, mtls_server: ServerProcess) -> None:
    with ModelServeClient(
        mtls_server.address,
        tls_ca=pki.ca.cert_path,
        tls_cert=pki.client.cert_path,
        tls_key=pki.client.key_pem,
        tls_server_name="localhost",
        token=TOKEN,
        timeout_s=CALL_TIMEOUT_S,
    ) as client:
        assert client.health().model_loaded


def test_http_port_needs_the_client_certificate_and_the_token_on_health(pki: Pki, mtls_server: ServerProcess) -> None:
    url = f"https://localhost:{mtls_server.http_port}/health"
    trust = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
    with pytest.raises(httpx.TransportError):  # no client certificate: the handshake fails
        httpx.get(url, verify=trust, timeout=CALL_TIMEOUT_S)
    trust.load_cert_chain(pki.client.cert_path, pki.client.key_path)
    with httpx.Client(verify=trust, timeout=CALL_TIMEOUT_S) as client:
        assert client.get(url).status_code == 401  # --auth-health: health needs the token too
        assert client.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


# --- configuration errors: refused at start, before the model loads ---------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--tls-cert-file", "{cert}"), "--tls-cert-file is set but --tls-key-file is not"),
        (("--tls-client-ca-file", "{ca}"), "--tls-client-ca-file needs --tls-cert-file and --tls-key-file"),
        (("--tls-cert-file", "{cert}", "--tls-key-file", "{missing}"), "--tls-key-file: cannot read"),
        (("--auth-token", "a", "--auth-token-file", "{cert}"), "set only one of --auth-token"),
    ],
    ids=["cert-without-key", "client-ca-without-cert", "unreadable-key", "two-tokens"],
)
def test_bad_security_settings_exit_2(pki: Pki, tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    paths = {"cert": pki.server.cert_path, "ca": pki.ca.cert_path, "missing": tmp_path / "missing.key"}
    server = start_server(tmp_path, *(a.format(**paths) for a in args))
    try:
        assert server.proc.wait(60) == 2, server.log()
    finally:
        server.terminate()
    assert "invalid TLS/auth settings" in server.log() and expected in server.log()


# --- in-process checks ------------------------------------------------------------------------------------------


def test_token_resolution(tmp_path: Path) -> None:
    assert resolve_token(Config()) is None
    assert resolve_token(Config(auth_token=" abc ")) == "abc"
    token_file = tmp_path / "token"
    token_file.write_text("abc\ndef\n")
    assert resolve_token(Config(auth_token_file=str(token_file))) == "abc"
    token_file.write_text("\n")
    with pytest.raises(ValueError, match="--auth-token-file"):
        resolve_token(Config(auth_token_file=str(token_file)))
    with pytest.raises(ValueError, match="printable ASCII"):
        resolve_token(Config(auth_token="t\u00f6ken"))


def test_tls_off_by_default_and_key_without_cert(pki: Pki) -> None:
    assert server_credentials(Config()) is None
    with pytest.raises(ValueError, match="--tls-key-file is set but --tls-cert-file is not"):
        server_credentials(Config(tls_key_file=str(pki.server.key_path)))
    assert server_credentials(Config(tls_cert_file=str(pki.server.cert_path), tls_key_file=str(pki.server.key_path)))


def test_help_never_shows_the_token_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODELSERVE_AUTH_TOKEN", TOKEN)
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    help_text = capsys.readouterr().out
    assert "--auth-token" in help_text and "(default: False)" in help_text  # other defaults still shown
    assert TOKEN not in help_text


class _CallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.method = method
        self.invocation_metadata = metadata


@pytest.mark.parametrize(
    "value",
    ["Bearer t\u00f6ken", "Bearer \ud800", "Bearer \udcff", b"Bearer \xff\xfe", "Bearer", "", f"Bearer {TOKEN} extra"],
    ids=["non-ascii", "high-surrogate", "low-surrogate", "bytes", "scheme-only", "empty", "trailing-word"],
)
async def test_interceptor_refuses_odd_values_without_crashing(value: str | bytes) -> None:
    """grpc clients refuse to send non-ASCII metadata, so the odd values are checked in process."""
    generate = grpc.unary_stream_rpc_method_handler(lambda request, context: iter(()))

    async def continuation(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        return generate

    interceptor = BearerTokenInterceptor(TOKEN)
    method = "/modelserve.v1.GenerationService/Generate"
    refused = await interceptor.intercept_service(continuation, _CallDetails(method, (("authorization", value),)))
    assert refused is not generate and refused is not None and refused.unary_stream is not None
    assert refused.request_deserializer is None  # an unauthenticated caller's request is never parsed
    accepted = await interceptor.intercept_service(continuation, _CallDetails(method, _bearer()))
    assert accepted is generate
    health = await interceptor.intercept_service(continuation, _CallDetails("/grpc.health.v1.Health/Check", ()))
    assert health is generate

    async def unknown_method(details: grpc.HandlerCallDetails) -> None:
        return None

    # An unknown method stays unknown (UNIMPLEMENTED): no rpc.method values made up by strangers in the metrics.
    unknown = await interceptor.intercept_service(unknown_method, _CallDetails("/x.Y/Z", (("authorization", value),)))
    assert unknown is None


def test_client_sends_the_token_as_metadata_without_tls() -> None:
    """grpc refuses call credentials on plain-text channels, so the token rides in each call's metadata."""
    with ModelServeClient("127.0.0.1:1", token=TOKEN, metadata=[("x-team", "a")]) as client:
        assert client._metadata == (("x-team", "a"), ("authorization", f"Bearer {TOKEN}"))
    with ModelServeClient("127.0.0.1:1", tls=True, token=TOKEN) as client:
        assert client._metadata == ()  # on TLS it is a call credential instead, never sent in clear text
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        ModelServeClient("127.0.0.1:1", tls_cert=b"x")
    with grpc.insecure_channel("127.0.0.1:1") as channel, pytest.raises(ValueError, match="either channel or TLS"):
        ModelServeClient(channel=channel, tls=True)
