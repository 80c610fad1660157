"""`modelserve-client`: talk to a modelserve server from a shell.

modelserve-client generate "Hello" --max-new-tokens 32 --temperature 0
modelserve-client generate --prompt-file prompt.txt --truncate-input-tokens 1024 -v
some-command | modelserve-client generate - --logprobs 3
modelserve-client chat --system "Answer briefly." --temperature 0.7
modelserve-client health | info [--json] | tokenize "some text"
modelserve-client --tls-ca ca.pem --token-file token.txt generate "Hello"
modelserve-client --address dns:///modelserve-headless.NAMESPACE.svc.cluster.local:50051 generate "Hello"
modelserve-client --address 10.0.0.7:50051,10.0.0.8:50051 generate "Hello"
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import sys
import threading
from collections.abc import Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, TypeAlias

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from modelserve_client.client import DEFAULT_ADDRESS, ModelServeClient, Stream
from modelserve_client.v1 import generation_pb2 as pb

if TYPE_CHECKING:
    from google._upb._message import FieldDescriptor as UpbFieldDescriptor

    # A message's DESCRIPTOR.fields hold either kind, by the protobuf backend.
    Field: TypeAlias = FieldDescriptor | UpbFieldDescriptor

TOKEN_ENV = "MODELSERVE_AUTH_TOKEN"
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"

# Exit statuses (also in --help).
EXIT_OK = 0
EXIT_ERROR = 1  # the server answered with an error status, or could not be reached
EXIT_USAGE = 2  # a bad command line, or a prompt that cannot be read
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_BROKEN_PIPE = 141  # stdout was closed early, as by `| head` (128 + SIGPIPE, what a shell reports)

EPILOG = f"""\
exit status: {EXIT_OK} done; {EXIT_ERROR} the server answered with an error (or could not be reached);
{EXIT_USAGE} a bad command line or an unreadable prompt; {EXIT_INTERRUPTED} interrupted (Ctrl-C);
{EXIT_BROKEN_PIPE} stdout was closed before the output was written (as by `| head -c 1`): the call is
cancelled and the rest of the output dropped, quietly, as a shell tool killed by SIGPIPE would.
"""


def _version() -> str:
    try:
        return version("modelserve-client")
    except PackageNotFoundError:  # running from a source tree without an install
        return "0.0.0+unknown"


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
    parser = argparse.ArgumentParser(
        prog="modelserve-client",
        description="Call a modelserve gRPC server.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help="server host:port; or many replicas: a dns:///NAME:PORT target whose name resolves to them all, "
        "or IP:PORT addresses separated by commas; calls go round robin over the SERVING ones "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--no-health-check",
        action="store_true",
        help="send calls whatever a replica's grpc.health.v1 says (needed when the server's health needs the "
        "token, --auth-health, without TLS); `health` never checks, so that it reaches a loading or draining server",
    )
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

    gen = commands.add_parser(
        "generate",
        help="stream a completion of PROMPT to stdout",
        description="Stream the completion's text to stdout (a newline is added at the end).\n"
        "Everything else (-v, --logprobs, errors) goes to stderr, so stdout is exactly the text.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.set_defaults(subparser=gen)
    gen.add_argument(
        "prompt",
        nargs="?",
        metavar="PROMPT",
        help="the prompt; - reads it from stdin (sent exactly as read, a final newline included)",
    )
    gen.add_argument(
        "--prompt-file",
        metavar="PATH",
        help="read the prompt from this UTF-8 file instead (for prompts too long for a command line; - is stdin)",
    )
    _add_generation_args(gen)
    gen.add_argument(
        "--logprobs",
        type=int,
        metavar="N",
        help="ask for each generated token's log-probability and the N most likely tokens at its step (0 to 20; "
        "0 = its own only); after the text, print them on stderr, one token a line: index, token (as a Python "
        "string literal), its logprob, then '|' and the N most likely as TOKEN LOGPROB pairs",
    )
    gen.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="print the finish reason, usage, timings and seed on stderr; when the server ends the stream "
        "with an error, also what its last message said",
    )

    chat = commands.add_parser(
        "chat",
        help="an interactive chat: each line is a user message, each reply streams to stdout",
        description="Chat with the model: each line read is a user message, and the assistant's reply streams\n"
        "to stdout as it is generated. The conversation is kept and sent whole each turn (the server lays it\n"
        "out with the model's chat template). Ctrl-C stops the reply (its call is cancelled; what arrived stays\n"
        "in the conversation, or the unanswered line leaves it), not the session; /exit or end of input\n"
        "(Ctrl-D) ends it. A turn the server refuses is printed on stderr and left out of the conversation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument("--system", metavar="TEXT", help="a system message that starts the conversation")
    _add_generation_args(chat)
    chat.add_argument(
        "--verbose", "-v", action="store_true", help="after each reply, print its finish reason, usage and timings"
    )

    health = commands.add_parser("health", help="print the server's detailed health")
    info = commands.add_parser("info", help="print the model's description and the server's limits")
    for sub in (health, info):
        sub.add_argument("--json", action="store_true", help="print the response as JSON instead of key: value lines")
    tok = commands.add_parser("tokenize", help="print the token ids of TEXT (JSON)")
    tok.add_argument("text")
    return parser


def _add_generation_args(parser: argparse.ArgumentParser) -> None:
    """The GenerationParameters flags that generate and chat share."""
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--min-new-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="0 = greedy")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--presence-penalty", type=float, help="-2 to 2, over the generated tokens (0 = off)")
    parser.add_argument("--frequency-penalty", type=float, help="-2 to 2, over the generated tokens (0 = off)")
    parser.add_argument("--min-p", type=float, help="0 to 1 (0 = off)")
    parser.add_argument(
        "--logit-bias",
        action="append",
        default=[],
        metavar="ID=BIAS",
        type=_logit_bias,
        help="add BIAS (-100 to 100) to token ID's logit (repeatable)",
    )
    parser.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument(
        "--truncate-input-tokens",
        type=int,
        metavar="N",
        help="keep only the prompt's last N tokens (the server's default, 0, rejects a prompt that does not fit)",
    )


# ---- generate ---------------------------------------------------------------------------------------------------


def _read_prompt(ns: argparse.Namespace) -> str:
    """PROMPT, or stdin for `-`, or --prompt-file; exits with EXIT_USAGE when none or both are given."""
    parser: argparse.ArgumentParser = ns.subparser
    if ns.prompt is not None and ns.prompt_file is not None:
        parser.error("give PROMPT or --prompt-file, not both")
    if ns.prompt is None and ns.prompt_file is None:
        parser.error("give PROMPT, - (read stdin) or --prompt-file PATH")
    source = ns.prompt_file if ns.prompt_file is not None else ns.prompt
    if ns.prompt_file is None and source != "-":
        return str(source)
    where = "stdin" if source == "-" else f"--prompt-file {source}"
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        parser.error(f"cannot read {where}: {exc.strerror or exc}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        parser.error(f"{where} is not UTF-8 text: {exc}")


def _logit_bias(text: str) -> tuple[int, float]:
    """--logit-bias ID=BIAS."""
    token_id, _, bias = text.partition("=")
    try:
        return int(token_id), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID=BIAS, e.g. 50256=-100, got {text!r}") from None


def _params(ns: argparse.Namespace) -> dict[str, Any]:
    names = (
        "max_new_tokens",
        "min_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "min_p",
    )
    params: dict[str, Any] = {name: getattr(ns, name) for name in names}
    params["logit_bias"] = dict(ns.logit_bias) or None
    params["stop"] = ns.stop
    params["ignore_eos"] = ns.ignore_eos or None
    params["truncate_input_tokens"] = ns.truncate_input_tokens
    return params


def _summary(last: pb.GenerateResponse) -> str:
    """One line for -v: the finish reason, usage, timings and seed of the last message."""
    usage = f"{last.usage.input_tokens} in, {last.usage.output_tokens} out"
    if last.finish_reason == pb.FINISH_REASON_UNSPECIFIED:  # the stream ended before its last message
        return f"[no last message | {usage} so far | request {last.request_id}]"
    reason = pb.FinishReason.Name(last.finish_reason)
    timings = last.timings
    return (
        f"[{reason} | {usage} | ttft {timings.time_to_first_token_seconds:.3f}s, total {timings.total_seconds:.3f}s"
        f" | seed {last.seed} | request {last.request_id}]"
    )


def _logprob_lines(rows: Sequence[pb.TokenLogprobs]) -> list[str]:
    """--logprobs' table: index, token, logprob, then the alternatives, in aligned columns."""
    if not rows:
        return ["logprobs: none arrived"]
    tokens = [repr(row.chosen.token) for row in rows]
    width = max(len(t) for t in tokens)
    index_width = len(str(len(rows) - 1))
    lines = ["logprobs (natural log): index, token, its logprob | the most likely tokens, each with its logprob"]
    for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
        line = f"{i:>{index_width}}  {token:<{width}}  {row.chosen.logprob:9.4f}"
        if row.top:
            line += "  | " + "  ".join(f"{alt.token!r} {alt.logprob:.4f}" for alt in row.top)
        lines.append(line.rstrip())
    return lines


def _generate(client: ModelServeClient, ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    prompt = _read_prompt(ns)
    last: pb.GenerateResponse | None = None
    logprobs: list[pb.TokenLogprobs] = []
    wrote_text = False
    status: grpc.RpcError | None = None
    params = _params(ns)
    if ns.logprobs is not None:
        params.update(logprobs=True, top_logprobs=ns.logprobs)
    with contextlib.closing(client.stream(prompt, params)) as stream:
        try:
            for message in stream:
                last = message
                logprobs.extend(message.logprobs)
                if message.text:
                    out.write(message.text)
                    out.flush()
                    wrote_text = True
        except grpc.RpcError as exc:
            status = exc
    if status is None or wrote_text:
        out.write("\n")
        out.flush()
    if ns.logprobs is not None and (logprobs or status is None):
        err.write("\n".join(_logprob_lines(logprobs)) + "\n")
    if ns.verbose and last is not None:
        print(_summary(last), file=err)
    if status is None:
        return EXIT_OK
    _print_status(status, err, verbose=ns.verbose)
    return EXIT_ERROR


def _print_status(exc: grpc.RpcError, err: TextIO, verbose: bool) -> None:
    """`error: CODE: details`; with verbose, also the retry pushback the server asked for."""
    if not isinstance(exc, grpc.Call):
        print(f"error: {exc}", file=err)
        return
    print(f"error: {exc.code().name}: {exc.details()}", file=err)
    if verbose:
        for key, value in exc.trailing_metadata() or ():
            if key == RETRY_PUSHBACK_KEY:
                print(f"retry after: {value} ms (the server's {RETRY_PUSHBACK_KEY})", file=err)


# ---- chat -------------------------------------------------------------------------------------------------------

EXIT_COMMAND = "/exit"


def _chat(client: ModelServeClient, ns: argparse.Namespace, stdin: TextIO, out: TextIO, err: TextIO) -> int:
    """The chat session (see the chat command's description); EXIT_ERROR if a turn failed."""
    interactive = stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        print(f"Ctrl-C stops a reply; {EXIT_COMMAND} or Ctrl-D ends the chat.", file=err)
    history: list[dict[str, str]] = [{"role": "system", "content": ns.system}] if ns.system else []
    params = _params(ns)
    failed = False
    while True:
        try:
            line = input("> ") if interactive else stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt: like a shell, a fresh line, not the end
            print(f"\n({EXIT_COMMAND} or Ctrl-D ends the chat)", file=err)
            continue
        if not interactive and not line:  # end of input
            break
        text = line.removesuffix("\n")
        if text.strip() == EXIT_COMMAND:
            break
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        reply, status = _chat_turn(client, history, params, out, err, ns.verbose)
        if status is not None:
            history.pop()
            _print_status(status, err, verbose=ns.verbose)
            if isinstance(status, grpc.Call) and status.code() is grpc.StatusCode.FAILED_PRECONDITION:
                return EXIT_ERROR  # the model has no chat template: no turn can succeed
            failed = True
        elif reply is None:
            history.pop()  # stopped before any text: as if the line had not been sent
        else:
            history.append({"role": "assistant", "content": reply})
    return EXIT_ERROR if failed else EXIT_OK


def _chat_turn(
    client: ModelServeClient,
    history: list[dict[str, str]],
    params: dict[str, Any],
    out: TextIO,
    err: TextIO,
    verbose: bool,
) -> tuple[str | None, grpc.RpcError | None]:
    """Stream one reply to `out`: (its text, None when stopped before any arrived; the error status, if any).
    Ctrl-C cancels the call and keeps what arrived.

    A reader thread iterates the call and this (main) thread only waits on a queue, so Ctrl-C's
    KeyboardInterrupt lands here, never inside grpc's iterator: raised there it can leave grpc's lock half
    released and the next turn hung or crashed (grpc issue #19973). A piece of text is recorded before it is
    written: Ctrl-C can land between any two bytecodes, and one that landed after a write but before the
    record would leave shown text with no line end and out of the history."""
    texts: list[str] = []
    last: pb.GenerateResponse | None = None
    status: grpc.RpcError | None = None
    replies: queue.SimpleQueue[pb.GenerateResponse | BaseException | None] = queue.SimpleQueue()
    with client.stream_chat(history, params) as stream:
        try:
            threading.Thread(target=_read_reply, args=(stream, replies), name="chat-reply", daemon=True).start()
            while (item := replies.get()) is not None:
                if isinstance(item, grpc.RpcError):
                    status = item
                elif isinstance(item, BaseException):
                    raise item
                else:
                    last = item
                    if item.text:
                        texts.append(item.text)
                        out.write(item.text)
                        out.flush()
        except KeyboardInterrupt:
            stream.cancel()  # the reader's stream ends; it exits on its own
            if texts:
                out.write("\n")
                out.flush()
            print("[stopped]", file=err)
            return "".join(texts) or None, None
    if status is None or texts:
        out.write("\n")
        out.flush()
    if verbose and last is not None and status is None:
        print(_summary(last), file=err)
    return "".join(texts), status


def _read_reply(stream: Stream, replies: queue.SimpleQueue[pb.GenerateResponse | BaseException | None]) -> None:
    """The chat reply's reader thread: each message, then the error (if any), then None."""
    try:
        for message in stream:
            replies.put(message)
    except BaseException as exc:  # handed to the main thread, which raises what is not a status
        replies.put(exc)
    finally:
        replies.put(None)


# ---- health and info --------------------------------------------------------------------------------------------


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit} ({n:,} bytes)"


def _scalar(field: Field, value: Any) -> str:
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type
        assert enum is not None
        name = enum.values_by_number[value].name if value in enum.values_by_number else str(value)
        prefix = "".join(f"_{c}" if c.isupper() else c.upper() for c in enum.name).lstrip("_") + "_"
        return name.removeprefix(prefix)  # SERVER_STATE_SERVING -> SERVING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if field.name.endswith("_seconds"):
            return f"{value:.3f} s"
        if field.name.endswith("_usage"):
            return f"{value:.1%}"
        return f"{value:g}"
    if isinstance(value, int) and field.name.endswith("_bytes"):
        return _human_bytes(value)
    if isinstance(value, str):
        return value if value else "-"
    return str(value)


def _inline(message: Message) -> str:
    """A small message on one line: role=bos token='<s>' token_id=1."""
    parts = []
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        shown = repr(value) if isinstance(value, str) else _scalar(field, value)
        parts.append(f"{field.name}={shown}")
    return " ".join(parts)


def _rows(message: Message, prefix: str = "") -> list[tuple[str, str]]:
    """(key, value) for every field, unset ones too; nested messages as dotted keys."""
    rows: list[tuple[str, str]] = []
    for field in message.DESCRIPTOR.fields:
        key, value = prefix + field.name, getattr(message, field.name)
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        if field.is_repeated:
            items = [_inline(v) if is_message else _scalar(field, v) for v in value]
            if is_message and items:
                rows.extend((key if i == 0 else "", item) for i, item in enumerate(items))
            else:
                rows.append((key, ", ".join(items) if items else "-"))
        elif is_message:
            rows.extend(_rows(value, key + "."))
        else:
            rows.append((key, _scalar(field, value)))
    return rows


def human_view(message: Message) -> str:
    """Aligned `key: value` lines, one per field (the default output of `health` and `info`)."""
    rows = _rows(message)
    width = max(len(key) for key, _ in rows) + 1
    return "\n".join(f"{key + ':' if key else '':<{width}} {value}".rstrip() for key, value in rows)


def _print_message(message: Message, as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json_format.MessageToJson(message, always_print_fields_with_no_presence=True), file=out)
    else:
        print(human_view(message), file=out)


# ---- main -------------------------------------------------------------------------------------------------------


def run(argv: Iterable[str] | None = None) -> int:
    """The CLI with its exit status; errors it expects are printed, never raised."""
    ns = build_parser().parse_args(None if argv is None else list(argv))
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
            health_check=False if ns.no_health_check or ns.command == "health" else None,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    with client:
        if ns.command == "generate":
            return _generate(client, ns, sys.stdout, sys.stderr)
        if ns.command == "chat":
            return _chat(client, ns, sys.stdin, sys.stdout, sys.stderr)
        try:
            if ns.command == "health":
                _print_message(client.health(), ns.json, sys.stdout)
            elif ns.command == "info":
                _print_message(client.model_info(), ns.json, sys.stdout)
            else:
                _print_message(client.tokenize(ns.text, return_tokens=True), True, sys.stdout)
        except grpc.RpcError as exc:
            _print_status(exc, sys.stderr, verbose=False)
            return EXIT_ERROR
    return EXIT_OK


def _stdout_closed() -> NoReturn:
    """Python's advice for SIGPIPE: point stdout at devnull (so the flush at exit cannot fail again)
    and exit; https://docs.python.org/3/library/signal.html#note-on-sigpipe"""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(EXIT_BROKEN_PIPE)


def main(argv: Iterable[str] | None = None) -> None:
    try:
        code = run(argv)
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not at interpreter exit
    except BrokenPipeError:
        _stdout_closed()
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":
    main()
