"""`modelserve-client`: talk to a modelserve server from a shell.

modelserve-client generate "Hello" --max-new-tokens 32 --temperature 0
modelserve-client health | info | tokenize "some text"
modelserve-client --tls-ca ca.pem --token-file token.txt generate "Hello"
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from modelserve_client.client import DEFAULT_ADDRESS, ModelServeClient
from modelserve_client.v1 import generation_pb2 as pb

TOKEN_ENV = "MODELSERVE_AUTH_TOKEN"


def _token(ns: argparse.Namespace) -> str | None:
    """--token, else --token-file's first line, else $MODELSERVE_AUTH_TOKEN (never printed)."""
    if ns.token:
        return str(ns.token).strip()
    if ns.token_file:
        try:
            lines = Path(ns.token_file).read_text().splitlines()
        except OSError as exc:
            sys.exit(f"error: --token-file: cannot read {ns.token_file}: {exc.strerror or exc}")
        token = lines[0].strip() if lines else ""
        if not token:
            sys.exit(f"error: --token-file: the first line of {ns.token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelserve-client", description="Call a modelserve gRPC server.")
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="server host:port (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=None, help="deadline for the call, in seconds")
    security = parser.add_argument_group("TLS and authentication")
    security.add_argument("--tls", action="store_true", help="use TLS, checked against the system's CA roots")
    security.add_argument("--tls-ca", metavar="PEM", help="use TLS, checked against this CA bundle")
    security.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS (with --tls-key)")
    security.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    security.add_argument("--tls-server-name", metavar="NAME", help="name to check the server's certificate against")
    security.add_argument(
        "--token", help=f"bearer token sent with every call (prefer the env var {TOKEN_ENV}: flags show in ps)"
    )
    security.add_argument("--token-file", metavar="PATH", help="file whose first line is the bearer token")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="stream a completion of PROMPT to stdout")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("--min-new-tokens", type=int)
    gen.add_argument("--temperature", type=float, help="0 = greedy")
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--repetition-penalty", type=float)
    gen.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--verbose", "-v", action="store_true", help="print the finish reason, usage and timings")

    commands.add_parser("health", help="print the server's detailed health")
    commands.add_parser("info", help="print the model's description")
    tok = commands.add_parser("tokenize", help="print the token ids of TEXT")
    tok.add_argument("text")
    return parser


def _print_message(message: Message) -> None:
    print(json_format.MessageToJson(message, always_print_fields_with_no_presence=True))


def main(argv: list[str] | None = None) -> None:
    ns = build_parser().parse_args(argv)
    try:
        client = ModelServeClient(
            ns.address,
            timeout_s=ns.timeout,
            tls=ns.tls,
            tls_ca=ns.tls_ca,
            tls_cert=ns.tls_cert,
            tls_key=ns.tls_key,
            tls_server_name=ns.tls_server_name,
            token=_token(ns),
        )
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    with client:
        try:
            if ns.command == "generate":
                params = {
                    k: getattr(ns, k)
                    for k in (
                        "max_new_tokens",
                        "min_new_tokens",
                        "temperature",
                        "top_p",
                        "top_k",
                        "seed",
                        "repetition_penalty",
                    )
                }
                params["stop"] = ns.stop
                params["ignore_eos"] = ns.ignore_eos or None
                last = None
                for message in client.stream(ns.prompt, params):
                    if message.text:
                        sys.stdout.write(message.text)
                        sys.stdout.flush()
                    last = message
                sys.stdout.write("\n")
                if ns.verbose and last is not None:
                    reason = pb.FinishReason.Name(last.finish_reason)
                    print(
                        f"[{reason} | {last.usage.input_tokens} in, {last.usage.output_tokens} out | "
                        f"ttft {last.timings.time_to_first_token_seconds:.3f}s, total {last.timings.total_seconds:.3f}s"
                        f" | seed {last.seed}]",
                        file=sys.stderr,
                    )
            elif ns.command == "health":
                _print_message(client.health())
            elif ns.command == "info":
                _print_message(client.model_info())
            else:
                _print_message(client.tokenize(ns.text, return_tokens=True))
        except grpc.RpcError as exc:
            call = exc if isinstance(exc, grpc.Call) else None
            detail = f"{call.code().name}: {call.details()}" if call else str(exc)
            print(f"error: {detail}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)


if __name__ == "__main__":
    main()
