"""Property-based fuzzing of every GenerationService request against a real server process.

Hypothesis draws random and extreme values for every field of every request message
(ints at the int32/uint64 edges, floats incl. nan/inf/-0.0/subnormals/huge, optional fields
set and unset, empty and long repeated fields, Unicode of every kind, empty and huge strings
around the prompt and gRPC message limits, batches of 0, 1 and many items), plus raw bytes
that are not a valid message (or are one of the wrong type). Every call must end with a proper
status (OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, OUT_OF_RANGE, or DEADLINE_EXCEEDED where the
test set a short deadline): never UNKNOWN, INTERNAL or a hang, and a non-OK status says why.
Where the contract says exactly what must happen (a field out of its documented range, a
message over the limit, a valid request), the test checks that too, and two small properties
pin down what the fuzzing found at the float32 edges of valid sampling parameters. Afterwards
the server must still be SERVING, answer a normal Generate, and go back to idle (no leaks).

The server runs with small limits so that the fuzzing is fast and reaches every limit.
Examples are derandomized: CI runs the same examples every time, so a failure is reproducible
and never flaky. Set MODELSERVE_FUZZ_RANDOM=1 (and MODELSERVE_FUZZ_SCALE=N for N times the
examples) to explore new ones locally.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from modelserve_client.v1 import generation_pb2 as pb
from modelserve_client.v1 import generation_pb2_grpc as pb_grpc
from tokenizers import Tokenizer

from bench import harness
from tests.conftest import ServerProcess, start_server

# The server's limits (flags below) and the contract's fixed ranges.
MAX_BATCH_SIZE = 4
MAX_MAX_NEW_TOKENS = 16
DEFAULT_MAX_NEW_TOKENS = 4
MAX_PROMPT_BYTES = 4096
MAX_MESSAGE_BYTES = 65536
MAX_BATCH_REQUESTS = 8
MAX_WAITING_REQUESTS = 4
KV_TOKENS = 1504  # --kv-cache-bytes at 512 bytes a token for the tiny Llama (94 blocks): less than its context
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20
MAX_REQUEST_ID_CHARS = 128
PRIORITY_RANGE = (-1000, 1000)

CALL_TIMEOUT_S = 30.0  # every call: a hang fails the test instead of blocking it
SHORT_DEADLINES_S = (0.001, 0.02, 0.2)  # the test's own deadlines: DEADLINE_EXCEEDED is fine then
IDLE_TIMEOUT_S = 20.0

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
F32_TINIEST = 1.401298464324817e-45  # the smallest float32 subnormal (1e-45 as a float32)
F32_1E_30 = 1.0000000031710769e-30  # 1e-30 as a float32
UINT64_MAX = 2**64 - 1
METHOD = "/modelserve.v1.GenerationService/"
PROPER = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
# Under load the server sheds requests (queue full) before it validates them, valid or not.
LOAD_SHED = grpc.StatusCode.RESOURCE_EXHAUSTED

_SCALE = max(1, int(os.environ.get("MODELSERVE_FUZZ_SCALE", "1")))
_DERANDOMIZE = os.environ.get("MODELSERVE_FUZZ_RANDOM") != "1"


def fuzz_settings(max_examples: int, shrink: bool = True) -> settings:
    """`shrink=False` where calls run concurrently: a timing-dependent failure shrinks for minutes."""
    return settings(
        max_examples=max_examples * _SCALE,
        phases=list(Phase) if shrink else [Phase.explicit, Phase.generate],
        derandomize=_DERANDOMIZE,
        database=None,  # nothing written into the tree; derandomized runs need no replay file
        deadline=None,  # a model step's time is not the property under test; CALL_TIMEOUT_S is
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


# ---- the server -----------------------------------------------------------------


@dataclass(frozen=True)
class Fuzz:
    """The server under fuzzing, a channel to it and what ModelInfo says of it."""

    server: ServerProcess
    channel: grpc.Channel
    stub: Any  # pb_grpc.GenerationServiceStub (untyped generated code)
    tokenizer: Tokenizer
    vocab_size: int
    max_sequence_length: int
    eos_token_ids: frozenset[int]


@pytest.fixture(scope="module")
def fuzz(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    server = start_server(
        tmp_path_factory.mktemp("fuzz-server"),
        "--model",
        str(model_dirs["llama"]),
        "--max-batch-size",
        str(MAX_BATCH_SIZE),
        "--max-max-new-tokens",
        str(MAX_MAX_NEW_TOKENS),
        "--default-max-new-tokens",
        str(DEFAULT_MAX_NEW_TOKENS),
        "--max-prompt-bytes",
        str(MAX_PROMPT_BYTES),
        "--max-message-bytes",
        str(MAX_MESSAGE_BYTES),
        "--max-batch-requests",
        str(MAX_BATCH_REQUESTS),
        "--max-waiting-requests",
        str(MAX_WAITING_REQUESTS),
        "--kv-cache-bytes",
        str(KV_TOKENS * 512),
        "--grace-s",
        "2",
    )
    try:
        server.wait_serving()
        with server.channel() as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=CALL_TIMEOUT_S)
            assert info.max_max_new_tokens == MAX_MAX_NEW_TOKENS
            assert info.default_max_new_tokens == DEFAULT_MAX_NEW_TOKENS
            assert 1 < info.max_sequence_length <= KV_TOKENS
            yield Fuzz(
                server,
                channel,
                stub,
                Tokenizer.from_file(str(model_dirs["llama"] / "tokenizer.json")),
                info.vocab_size,
                info.max_sequence_length,
                frozenset(info.eos_token_ids),
            )
    finally:
        server.terminate()


def wait_idle(fuzz: Fuzz) -> None:
    """Every request, cancelled ones included, has left the engine (bounded)."""
    view = harness.wait_idle(fuzz.stub, IDLE_TIMEOUT_S)
    assert view.state == pb.SERVER_STATE_SERVING and view.model_loaded, view
    assert harness.is_idle(view), f"not idle {IDLE_TIMEOUT_S}s after the fuzzing: {view}"


def assert_alive_and_idle(fuzz: Fuzz) -> None:
    """SERVING on grpc.health.v1, idle (every fuzzed request, cancelled ones included, has left the
    engine), a normal Generate answers with text, and it leaves nothing behind either."""
    assert fuzz.server.proc.poll() is None, f"the server died; log:\n{fuzz.server.log()}"
    health = health_pb2_grpc.HealthStub(fuzz.channel)
    for service in ("", "modelserve.v1.GenerationService"):
        check = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S)
        assert check.status == health_pb2.HealthCheckResponse.SERVING, service
    wait_idle(fuzz)
    params = pb.GenerationParameters(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    messages = list(fuzz.stub.Generate(pb.GenerateRequest(prompt="Hello", params=params), timeout=CALL_TIMEOUT_S))
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert "".join(m.text for m in messages), "a normal Generate gave no text"
    wait_idle(fuzz)


# ---- strategies ------------------------------------------------------------------

# Characters a tokenizer or a UTF-8 boundary might trip on (proto strings cannot hold lone surrogates).
ODD_PIECES = [
    "\x00",
    "\x7f",
    "\u202e",  # right-to-left override
    "\u200f",  # right-to-left mark
    "\u200b",  # zero width space
    "\u0301",  # combining acute accent
    "e\u0301",
    "\ue000",  # private use
    "\U000f0000",  # supplementary private use
    "\U0010fffd",
    "\ufeff",
    "\ufffd",
    "\uffff",
    "👩\u200d👩\u200d👧",
    "👍🏽",
    "🙂",
    "日本語",
    "中文",
    "한국어",
    "العربية",
    "<|endoftext|>",
    "\r\n",
    "\t",
    " ",
]
SNIPPETS = ["a", "Hello ", "日本語", "🙂", "e\u0301", "\x00", "<|endoftext|>", "\u202e"]


def unicode_text(min_size: int = 0, max_size: int = 24) -> st.SearchStrategy[str]:
    piece = st.one_of(st.characters(codec="utf-8"), st.sampled_from(ODD_PIECES))
    return st.lists(piece, min_size=min_size, max_size=max_size).map("".join)


def sized_text(snippet: str, n_bytes: int) -> str:
    """Exactly n_bytes of UTF-8: the snippet repeated, topped up with ASCII."""
    size = len(snippet.encode())
    return snippet * (n_bytes // size) + "a" * (n_bytes % size)


# Around the prompt limit, and around / far past the gRPC message limit (and the contract's 1 MiB).
BIG_SIZES = [
    MAX_PROMPT_BYTES - 1,
    MAX_PROMPT_BYTES,
    MAX_PROMPT_BYTES + 1,
    MAX_MESSAGE_BYTES - 64,
    MAX_MESSAGE_BYTES - 4,
    MAX_MESSAGE_BYTES + 1,
    1 << 20,
    (1 << 20) + 1,
]
big_text = st.builds(sized_text, st.sampled_from(SNIPPETS), st.sampled_from(BIG_SIZES))
prompts = st.one_of(
    st.sampled_from(["Hello", "", "The quick brown fox", " ", "\x00"]),
    unicode_text(),
    big_text,
)


def ints(low: int, high: int, *edges: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([e for e in (low, high, *edges) if low <= e <= high]), st.integers(low, high))


def wild_int32(fuzz: Fuzz) -> st.SearchStrategy[int]:
    v, n = fuzz.vocab_size, fuzz.max_sequence_length
    edges = [INT32_MIN + 1, -1001, -2, -1, 0, 1, 2, 15, 16, 17, 20, 21, 128, 129, 256, 257, 1000, 1001]
    edges += [v - 1, v, v + 1, n - 2, n - 1, n, INT32_MAX - 1]
    return ints(INT32_MIN, INT32_MAX, *edges)


uint64s = ints(0, UINT64_MAX, 1, 2**31, 2**32, 2**63 - 1, 2**63)
FLOAT_EDGES = [
    math.nan,
    -math.nan,
    math.inf,
    -math.inf,
    0.0,
    -0.0,
    5e-324,  # a double subnormal: 0 as a float32
    1e-45,  # the smallest float32 subnormal
    -1e-45,
    1.1754942e-38,  # the largest float32 subnormal
    1e-30,
    0.5,
    1.0,
    1.0000001,
    10.0,
    10.000001,
    100.0,
    100.00001,
    3.4028235e38,  # float32 max
    3.5e38,  # rounds to inf as a float32
    1e300,
    -1e300,
]
wild_floats = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(width=32), st.floats())

# The fields that have an invalid range ("one_wild" mode makes one of them wild); seed and the bools have none.
WILD_FIELDS = (
    "max_new_tokens",
    "min_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "stop_token_ids",
    "repetition_penalty",
    "top_logprobs",
    "truncate_input_tokens",
    "request_id",
    "priority",
)


def unset_or(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


def generate_requests(fuzz: Fuzz) -> st.SearchStrategy[pb.GenerateRequest]:
    """Mostly-valid requests (every field in range), one field wild, or everything wild."""
    n_ctx = fuzz.max_sequence_length
    wild32 = wild_int32(fuzz)
    stop_text = st.one_of(
        unicode_text(min_size=1, max_size=6),
        st.sampled_from(["e", " ", "\x00", "\u0301", "o", ".", "🙂", "x" * MAX_STOP_CHARS]),
    )
    wild_stops = st.lists(
        st.one_of(unicode_text(max_size=8), st.sampled_from(["", "x" * (MAX_STOP_CHARS + 1), "🙂" * 300])),
        max_size=MAX_STOP_SEQUENCES + 4,
    )

    @st.composite
    def build(draw: st.DrawFn) -> pb.GenerateRequest:
        mode = draw(st.sampled_from(["valid", "valid", "one_wild", "wild"]))
        wild_one = draw(st.sampled_from(WILD_FIELDS)) if mode == "one_wild" else None

        def pick(name: str, valid: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]) -> Any:
            return draw(wild if mode == "wild" or name == wild_one else valid)

        p: dict[str, Any] = {}
        p["max_new_tokens"] = pick("max_new_tokens", unset_or(ints(1, MAX_MAX_NEW_TOKENS)), unset_or(wild32))
        cap = p["max_new_tokens"] if p["max_new_tokens"] is not None else DEFAULT_MAX_NEW_TOKENS
        p["min_new_tokens"] = pick("min_new_tokens", unset_or(ints(0, max(0, cap))), unset_or(wild32))
        p["temperature"] = pick(
            "temperature",
            unset_or(st.one_of(st.sampled_from([0.0, -0.0, 1e-45, 1.0, 100.0]), st.floats(0, 100, width=32))),
            unset_or(wild_floats),
        )
        p["top_p"] = pick(
            "top_p",
            unset_or(st.one_of(st.sampled_from([1e-45, 1.0]), st.floats(0, 1, exclude_min=True, width=32))),
            unset_or(wild_floats),
        )
        p["top_k"] = pick("top_k", unset_or(ints(0, fuzz.vocab_size, 1)), unset_or(wild32))
        p["seed"] = draw(unset_or(uint64s))  # every uint64 is a valid seed
        p["stop"] = pick("stop", st.lists(stop_text, max_size=MAX_STOP_SEQUENCES), wild_stops)
        p["stop_token_ids"] = pick(
            "stop_token_ids",
            st.lists(ints(0, fuzz.vocab_size - 1, *fuzz.eos_token_ids), max_size=MAX_STOP_SEQUENCES),
            st.lists(wild32, max_size=MAX_STOP_SEQUENCES + 4),
        )
        p["repetition_penalty"] = pick(
            "repetition_penalty",
            unset_or(st.one_of(st.sampled_from([1e-45, 1.0, 10.0]), st.floats(0, 10, exclude_min=True, width=32))),
            unset_or(wild_floats),
        )
        p["logprobs"] = draw(st.booleans())
        p["top_logprobs"] = pick(
            "top_logprobs", ints(0, MAX_TOP_LOGPROBS if p["logprobs"] else 0), st.one_of(ints(-1, 21), wild32)
        )
        p["truncate_input_tokens"] = pick("truncate_input_tokens", st.one_of(st.just(0), ints(1, n_ctx - 1)), wild32)
        p["ignore_eos"] = draw(st.booleans())
        p["include_stop_sequence"] = draw(st.booleans())
        request_id = pick(
            "request_id",
            st.one_of(st.just(""), unicode_text(max_size=16), st.just("r" * MAX_REQUEST_ID_CHARS)),
            st.one_of(
                unicode_text(max_size=200),
                st.sampled_from(["r" * (MAX_REQUEST_ID_CHARS + 1), "🙂" * MAX_REQUEST_ID_CHARS, "x" * 5000]),
            ),
        )
        priority = pick("priority", ints(*PRIORITY_RANGE, 0, -1, 1), wild32)
        params = pb.GenerationParameters(**{k: v for k, v in p.items() if v is not None})
        return pb.GenerateRequest(prompt=draw(prompts), params=params, request_id=request_id, priority=priority)

    return build()


# Valid serialized messages of every type: sent to the wrong method they are "valid bytes, wrong type".
OTHER_MESSAGES = [
    pb.GenerateRequest(prompt="Hello", params=pb.GenerationParameters(max_new_tokens=2)).SerializeToString(),
    pb.GenerateRequest(prompt="Hi", priority=-5, request_id="x").SerializeToString(),
    pb.BatchGenerateRequest(requests=[pb.GenerateRequest(prompt="Hi")]).SerializeToString(),
    pb.TokenizeRequest(text="Hello", add_special_tokens=True, return_tokens=True).SerializeToString(),
    pb.ModelInfoRequest().SerializeToString(),
    pb.HealthRequest().SerializeToString(),
    health_pb2.HealthCheckRequest(service="x").SerializeToString(),
    pb.GenerateResponse(
        request_id="r", text="t", token_ids=[1, 2], finish_reason=pb.FINISH_REASON_LENGTH
    ).SerializeToString(),
    pb.ModelInfoResponse(model_id="m", vocab_size=5).SerializeToString(),
]


def _varint(n: int) -> bytes:
    n &= (1 << 70) - 1  # up to 10 bytes: negative ints become 64-bit two's complement, some overlong
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


@st.composite
def wire_messages(draw: st.DrawFn, depth: int = 0) -> bytes:
    """Protobuf wire format, mostly well-formed: right and wrong wire types for every field,
    huge and overlong varints, bad UTF-8 in strings, nested junk, truncation, groups."""
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        field = draw(st.one_of(st.integers(1, 15), st.sampled_from([0, 16, 19000, 2**29 - 1])))
        wire = draw(st.sampled_from([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 7]))
        out += _varint(field << 3 | wire)
        if wire == 0:
            out += _varint(draw(st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([2**70 - 1, 2**64]))))
        elif wire == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif wire == 5:
            out += draw(st.binary(min_size=4, max_size=4))
        elif wire == 2:
            body = draw(
                st.one_of(
                    st.binary(max_size=16),
                    st.text(max_size=8).map(str.encode),
                    st.sampled_from([b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]),  # invalid UTF-8
                    wire_messages(depth + 1) if depth < 2 else st.just(b""),
                )
            )
            declared = len(body) + draw(st.sampled_from([0, 0, 0, 1, -1, 2**31]))
            out += _varint(max(declared, 0)) + body
    if draw(st.booleans()) and out:
        out = out[: draw(st.integers(0, len(out)))]
    return out


raw_payloads = st.one_of(st.binary(max_size=64), wire_messages(), st.sampled_from(OTHER_MESSAGES))


# ---- the oracle ------------------------------------------------------------------


def _float_ok(params: pb.GenerationParameters, name: str, low: float, high: float, low_open: bool) -> bool:
    if not params.HasField(name):
        return True
    value = getattr(params, name)  # as the server sees it: rounded to float32
    return math.isfinite(value) and (low < value if low_open else low <= value) and value <= high


def problems(fuzz: Fuzz, request: pb.GenerateRequest, n_tokens: int | None) -> set[str]:
    """Every field of `request` outside its documented range. `n_tokens` is the prompt's token
    count (None when it is too big to ask). An empty set means the request must succeed."""
    p, n_ctx, bad = request.params, fuzz.max_sequence_length, set()
    if len(request.prompt.encode()) > MAX_PROMPT_BYTES:
        bad.add("prompt")
    if not 0 <= p.truncate_input_tokens <= n_ctx - 1:
        bad.add("params.truncate_input_tokens")
    room: int | None = None
    if n_tokens is not None:
        keep = p.truncate_input_tokens
        n = min(n_tokens, keep) if keep > 0 else n_tokens
        if n == 0 or n > n_ctx - 1:
            bad.add("prompt")
        else:
            room = n_ctx - n
    if p.HasField("max_new_tokens"):
        max_new = p.max_new_tokens
        if not 1 <= max_new <= MAX_MAX_NEW_TOKENS or (room is not None and max_new > room):
            bad.add("params.max_new_tokens")
    else:
        max_new = DEFAULT_MAX_NEW_TOKENS if room is None else min(DEFAULT_MAX_NEW_TOKENS, room)
    if not 0 <= (p.min_new_tokens if p.HasField("min_new_tokens") else 0) <= max_new:
        bad.add("params.min_new_tokens")
    if not _float_ok(p, "temperature", 0.0, 100.0, low_open=False):
        bad.add("params.temperature")
    if not _float_ok(p, "top_p", 0.0, 1.0, low_open=True):
        bad.add("params.top_p")
    if not _float_ok(p, "repetition_penalty", 0.0, 10.0, low_open=True):
        bad.add("params.repetition_penalty")
    if p.HasField("top_k") and not 0 <= p.top_k <= fuzz.vocab_size:
        bad.add("params.top_k")
    if len(p.stop) > MAX_STOP_SEQUENCES or any(not 1 <= len(s) <= MAX_STOP_CHARS for s in p.stop):
        bad.add("params.stop")
    if len(p.stop_token_ids) > MAX_STOP_SEQUENCES or any(not 0 <= t < fuzz.vocab_size for t in p.stop_token_ids):
        bad.add("params.stop_token_ids")
    if not 0 <= p.top_logprobs <= MAX_TOP_LOGPROBS or (p.top_logprobs and not p.logprobs):
        bad.add("params.top_logprobs")
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        bad.add("request_id")
    if not PRIORITY_RANGE[0] <= request.priority <= PRIORITY_RANGE[1]:
        bad.add("priority")
    return bad


def token_count(fuzz: Fuzz, prompt: str) -> int | None:
    """The prompt's tokens as Generate counts them (the server's own Tokenize), when it may be asked."""
    if len(prompt.encode()) > MAX_PROMPT_BYTES:
        return None
    response = fuzz.stub.Tokenize(pb.TokenizeRequest(text=prompt, add_special_tokens=True), timeout=CALL_TIMEOUT_S)
    return int(response.token_count)


def effective_max_new(fuzz: Fuzz, request: pb.GenerateRequest, n_prompt: int) -> int:
    if request.params.HasField("max_new_tokens"):
        return int(request.params.max_new_tokens)
    return min(DEFAULT_MAX_NEW_TOKENS, fuzz.max_sequence_length - n_prompt)


def status_of(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The code and details of a failed call (the RpcError a call raises is also its grpc.Call)."""
    call = cast(grpc.Call, exc)
    return call.code(), call.details() or ""


def identity(data: bytes) -> bytes:
    return data


def assert_status_details(code: grpc.StatusCode, details: str, context: str) -> None:
    assert code in PROPER, f"improper status {code} ({details!r}) for {context}"
    assert details and details.strip(), f"{code} without a message for {context}"


def assert_invalid_names_a_field(details: str, bad: set[str], prefix: str = "") -> None:
    named = [name for name in bad if prefix + name in details]
    assert named, f"the message {details!r} names none of the fields out of range: {sorted(bad)}"


@dataclass
class Output:
    """A finished generation, from a stream or a batch item."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[Any]
    input_tokens: int
    output_tokens: int
    finish_reason: int
    seed: int


def assert_result_keeps_contract(fuzz: Fuzz, request: pb.GenerateRequest, n_tokens: int, out: Output) -> None:
    p = request.params
    keep = p.truncate_input_tokens
    n_prompt = min(n_tokens, keep) if keep else n_tokens
    max_new = effective_max_new(fuzz, request, n_prompt)
    ids = out.token_ids
    assert out.request_id == (request.request_id or out.request_id) and out.request_id
    assert out.input_tokens == n_prompt
    assert out.output_tokens == len(ids) <= max_new
    assert all(0 <= t < fuzz.vocab_size for t in ids)
    reason = out.finish_reason
    assert reason in (
        pb.FINISH_REASON_LENGTH,
        pb.FINISH_REASON_EOS_TOKEN,
        pb.FINISH_REASON_STOP_SEQUENCE,
        pb.FINISH_REASON_STOP_TOKEN,
    ), pb.FinishReason.Name(reason)
    if reason == pb.FINISH_REASON_LENGTH:
        assert len(ids) == max_new
    if reason == pb.FINISH_REASON_EOS_TOKEN:
        assert not p.ignore_eos and ids and ids[-1] in fuzz.eos_token_ids
    if reason == pb.FINISH_REASON_STOP_TOKEN:
        assert ids and ids[-1] in p.stop_token_ids
    if reason in (pb.FINISH_REASON_EOS_TOKEN, pb.FINISH_REASON_STOP_TOKEN):
        assert len(ids) >= (p.min_new_tokens if p.HasField("min_new_tokens") else 0)
    if p.HasField("seed"):
        assert out.seed == p.seed
    if p.logprobs:
        assert [lp.chosen.token_id for lp in out.logprobs] == ids
        assert all(len(lp.top) == min(p.top_logprobs, fuzz.vocab_size) for lp in out.logprobs)
    else:
        assert not out.logprobs
    # An ending EOS or stop token adds no text of its own.
    ending = reason in (pb.FINISH_REASON_EOS_TOKEN, pb.FINISH_REASON_STOP_TOKEN)
    decoded = fuzz.tokenizer.decode(ids[:-1] if ending else ids, skip_special_tokens=True)
    if reason == pb.FINISH_REASON_STOP_SEQUENCE:
        assert p.stop
        assert decoded.startswith(out.text) or "\ufffd" in decoded
        if p.include_stop_sequence:
            assert any(out.text.endswith(s) for s in p.stop), (out.text, list(p.stop))
        else:
            assert not any(s in out.text for s in p.stop), (out.text, list(p.stop))
    else:
        assert out.text == decoded
        assert not any(s in out.text for s in p.stop), (out.text, list(p.stop))


def run_generate(
    fuzz: Fuzz, request: pb.GenerateRequest, timeout_s: float = CALL_TIMEOUT_S, cancel_after: int | None = None
) -> None:
    """One Generate against the oracle."""
    too_big = request.ByteSize() > MAX_MESSAGE_BYTES
    n_tokens = None if too_big else token_count(fuzz, request.prompt)
    bad = problems(fuzz, request, n_tokens)
    call = fuzz.stub.Generate(request, timeout=timeout_s)
    messages: list[pb.GenerateResponse] = []
    try:
        for message in call:
            messages.append(message)
            if cancel_after is not None and len(messages) > cancel_after:
                call.cancel()
    except grpc.RpcError as exc:
        code, details = status_of(exc)
        if code == grpc.StatusCode.CANCELLED and cancel_after is not None:
            return  # we cancelled it
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout_s < CALL_TIMEOUT_S:
            return  # our own short deadline
        assert_status_details(code, details, f"Generate({_show(request)})")
        if too_big:
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
        elif code != LOAD_SHED:
            assert bad, f"a valid request failed: {code} {details!r} for {_show(request)}"
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details, sorted(bad))
            assert_invalid_names_a_field(details, bad)
        return
    assert not too_big and not bad, f"accepted, but {sorted(bad) or 'too big'}: {_show(request)}"
    assert n_tokens is not None and len(messages) >= 2
    first, last = messages[0], messages[-1]
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert last.finish_reason != pb.FINISH_REASON_UNSPECIFIED, "the stream ended without a finish_reason"
    assert not first.token_ids and not first.text
    assert all(m.request_id == first.request_id for m in messages)
    assert all(m.usage.input_tokens == first.usage.input_tokens for m in messages)
    out = Output(
        request_id=first.request_id,
        text="".join(m.text for m in messages),
        token_ids=[t for m in messages for t in m.token_ids],
        logprobs=[lp for m in messages for lp in m.logprobs],
        input_tokens=first.usage.input_tokens,
        output_tokens=last.usage.output_tokens,
        finish_reason=last.finish_reason,
        seed=last.seed,
    )
    assert_result_keeps_contract(fuzz, request, n_tokens, out)


def _show(message: Any) -> str:
    text = str(message)
    return text if len(text) < 600 else text[:600] + f"... ({message.ByteSize()} bytes)"


# ---- the tests -------------------------------------------------------------------


def test_fuzz_generate(fuzz: Fuzz) -> None:
    deadlines = st.sampled_from([CALL_TIMEOUT_S] * 8 + list(SHORT_DEADLINES_S))
    cancels = st.sampled_from([None] * 8 + [0, 1, 2])

    @fuzz_settings(200)
    @given(request=generate_requests(fuzz), timeout_s=deadlines, cancel_after=cancels)
    def check(request: pb.GenerateRequest, timeout_s: float, cancel_after: int | None) -> None:
        run_generate(fuzz, request, timeout_s, cancel_after)

    check()
    assert_alive_and_idle(fuzz)


def test_out_of_range_priority_is_invalid_argument(fuzz: Fuzz) -> None:
    """The contract's range is [-1000, 1000]; out of it is a caller's mistake, never clamped."""
    for priority in (PRIORITY_RANGE[0], 0, PRIORITY_RANGE[1]):
        run_generate(fuzz, pb.GenerateRequest(prompt="Hello", priority=priority))
    for priority in (INT32_MIN, PRIORITY_RANGE[0] - 1, PRIORITY_RANGE[1] + 1, INT32_MAX):
        with pytest.raises(grpc.RpcError) as err:
            list(fuzz.stub.Generate(pb.GenerateRequest(prompt="Hello", priority=priority), timeout=CALL_TIMEOUT_S))
        code, details = status_of(err.value)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (priority, code, details)
        assert "priority" in details and "-1000" in details and "1000" in details, details


def test_tiny_temperature_samples_like_greedy(fuzz: Fuzz) -> None:
    """Every temperature in (0, 100] is valid, down to the float32 subnormals, and as it nears 0
    sampling nears argmax: a tiny temperature must pick the greedy tokens, not NaN garbage."""
    greedy: dict[str, list[int]] = {}

    def tokens(prompt: str, **params: Any) -> list[int]:
        request = pb.GenerateRequest(
            prompt=prompt, params=pb.GenerationParameters(max_new_tokens=8, ignore_eos=True, **params)
        )
        return [t for m in fuzz.stub.Generate(request, timeout=CALL_TIMEOUT_S) for t in m.token_ids]

    @fuzz_settings(12)
    @given(
        temperature=st.one_of(
            st.sampled_from([F32_TINIEST, 1.1754942e-38]), st.floats(F32_TINIEST, F32_1E_30, width=32)
        ),
        seed=uint64s,
        prompt=st.sampled_from(["Hello", "The quick brown fox", "日本語"]),
    )
    def check(temperature: float, seed: int, prompt: str) -> None:
        if prompt not in greedy:
            greedy[prompt] = tokens(prompt, temperature=0.0)
        assert tokens(prompt, temperature=temperature, seed=seed) == greedy[prompt]

    check()


def test_tiny_repetition_penalty_keeps_suppressed_tokens_suppressed(fuzz: Fuzz) -> None:
    """Every repetition_penalty in (0, 10] is valid. A tiny one makes the seen tokens' logits huge;
    sampling must still never pick a stop token or EOS before min_new_tokens."""
    last_id = fuzz.vocab_size - 1  # where a NaN distribution's inverse-CDF draw lands

    @fuzz_settings(8)
    @given(
        penalty=st.one_of(st.just(F32_TINIEST), st.floats(F32_TINIEST, F32_1E_30, width=32)),
        seed=uint64s,
        temperature=st.sampled_from([1.0, 0.7]),
    )
    def check(penalty: float, seed: int, temperature: float) -> None:
        params = pb.GenerationParameters(
            max_new_tokens=8,
            min_new_tokens=8,
            stop_token_ids=[last_id],
            repetition_penalty=penalty,
            temperature=temperature,
            seed=seed,
        )
        messages = list(fuzz.stub.Generate(pb.GenerateRequest(prompt="Hello", params=params), timeout=CALL_TIMEOUT_S))
        ids = [t for m in messages for t in m.token_ids]
        assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH and len(ids) == 8, ids
        assert not {last_id, *fuzz.eos_token_ids} & set(ids), ids

    check()


def test_fuzz_batch_generate(fuzz: Fuzz) -> None:
    requests = generate_requests(fuzz)
    batches = st.one_of(
        st.lists(requests, max_size=2),
        st.lists(requests, min_size=MAX_BATCH_REQUESTS - 1, max_size=MAX_BATCH_REQUESTS + 1),
        st.sampled_from([0, 1, MAX_BATCH_REQUESTS, MAX_BATCH_REQUESTS + 1, 300]).map(
            lambda n: [pb.GenerateRequest(prompt="Hi", params=pb.GenerationParameters(max_new_tokens=1))] * n
        ),
    )

    @fuzz_settings(40)
    @given(items=batches)
    def check(items: list[pb.GenerateRequest]) -> None:
        request = pb.BatchGenerateRequest(requests=items)
        too_big = request.ByteSize() > MAX_MESSAGE_BYTES
        try:
            response = fuzz.stub.BatchGenerate(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            code, details = status_of(exc)
            assert_status_details(code, details, f"BatchGenerate of {len(items)} items")
            if too_big:
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
            elif not 1 <= len(items) <= MAX_BATCH_REQUESTS:
                assert code == grpc.StatusCode.INVALID_ARGUMENT and "requests" in details, (code, details)
            else:  # the answer (logprobs of many items) may not fit the send limit
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
            return
        assert not too_big and 1 <= len(items) <= MAX_BATCH_REQUESTS
        assert len(response.items) == len(items)
        for i, (item, outcome) in enumerate(zip(items, response.items, strict=True)):
            n_tokens = token_count(fuzz, item.prompt)
            bad = problems(fuzz, item, n_tokens)
            kind = outcome.WhichOneof("outcome")
            if kind == "error":
                assert outcome.error.message.strip(), (i, outcome.error)
                if outcome.error.code != LOAD_SHED.value[0]:
                    assert bad, (i, outcome.error, _show(item))
                    assert outcome.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], (i, outcome.error)
                    assert_invalid_names_a_field(outcome.error.message, bad, prefix=f"requests[{i}].")
                continue
            assert kind == "result" and not bad, (i, sorted(bad), _show(item))
            assert n_tokens is not None
            result = outcome.result
            out = Output(
                request_id=result.request_id,
                text=result.text,
                token_ids=list(result.token_ids),
                logprobs=list(result.logprobs),
                input_tokens=result.usage.input_tokens,
                output_tokens=result.usage.output_tokens,
                finish_reason=result.finish_reason,
                seed=result.seed,
            )
            assert_result_keeps_contract(fuzz, item, n_tokens, out)

    check()
    assert_alive_and_idle(fuzz)


def test_fuzz_tokenize(fuzz: Fuzz) -> None:
    @fuzz_settings(60)
    @given(text=prompts, add_special_tokens=st.booleans(), return_tokens=st.booleans())
    def check(text: str, add_special_tokens: bool, return_tokens: bool) -> None:
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens, return_tokens=return_tokens)
        try:
            response = fuzz.stub.Tokenize(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            code, details = status_of(exc)
            assert_status_details(code, details, f"Tokenize of {len(text.encode())} bytes")
            if request.ByteSize() > MAX_MESSAGE_BYTES:
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
            else:
                assert len(text.encode()) > MAX_PROMPT_BYTES, (code, details)
                assert code == grpc.StatusCode.INVALID_ARGUMENT and "text" in details, (code, details)
            return
        assert len(text.encode()) <= MAX_PROMPT_BYTES
        expected = fuzz.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        assert list(response.token_ids) == expected
        assert response.token_count == len(expected)
        assert len(response.tokens) == (len(expected) if return_tokens else 0)

    check()
    assert_alive_and_idle(fuzz)


# Full method paths and the response type each answers with; the standard health Check too.
RAW_METHODS: dict[str, Any] = {
    METHOD + "Generate": pb.GenerateResponse,
    METHOD + "BatchGenerate": pb.BatchGenerateResponse,
    METHOD + "Tokenize": pb.TokenizeResponse,
    METHOD + "ModelInfo": pb.ModelInfoResponse,
    METHOD + "Health": pb.HealthResponse,
    "/grpc.health.v1.Health/Check": health_pb2.HealthCheckResponse,
}


@pytest.mark.parametrize("method", list(RAW_METHODS), ids=lambda m: m.rsplit(".", 1)[-1])
def test_fuzz_raw_bytes(fuzz: Fuzz, method: str) -> None:
    """Bytes that are not a valid message, or a valid one of another type, to every method
    (identity serializers: bytes in, bytes out). Undecodable bytes are the caller's mistake."""
    response_type = RAW_METHODS[method]

    @fuzz_settings(50)
    @given(payload=raw_payloads)
    def check(payload: bytes) -> None:
        try:
            if method.endswith("/Generate"):
                stream = fuzz.channel.unary_stream(method, request_serializer=identity, response_deserializer=identity)
                call = stream(payload, timeout=CALL_TIMEOUT_S)
                messages = [pb.GenerateResponse.FromString(raw) for raw in call]
                assert messages and messages[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
            else:
                unary = fuzz.channel.unary_unary(method, request_serializer=identity, response_deserializer=identity)
                response_type.FromString(unary(payload, timeout=CALL_TIMEOUT_S))
        except grpc.RpcError as exc:
            code, details = status_of(exc)
            if method.startswith("/grpc.health.v1.") and code == grpc.StatusCode.NOT_FOUND:
                return  # the standard health protocol's answer for a service name it does not know
            assert_status_details(code, details, f"{method}({payload!r})")

    check()
    assert_alive_and_idle(fuzz)


def test_fuzz_concurrent_mixed_requests(fuzz: Fuzz) -> None:
    """Several fuzzed Generates at once (some cancelled or with short deadlines): the queue limits
    may shed some, but every one ends properly and nothing is left behind."""
    calls = st.tuples(
        generate_requests(fuzz),
        st.sampled_from([CALL_TIMEOUT_S] * 4 + list(SHORT_DEADLINES_S)),
        st.sampled_from([None] * 4 + [0, 1]),
    )

    @fuzz_settings(15, shrink=False)
    @given(batch=st.lists(calls, min_size=2, max_size=MAX_BATCH_SIZE + MAX_WAITING_REQUESTS + 2))
    def check(batch: list[tuple[pb.GenerateRequest, float, int | None]]) -> None:
        with ThreadPoolExecutor(len(batch)) as pool:
            for future in [pool.submit(run_generate, fuzz, *call) for call in batch]:
                future.result()

    check()
    assert_alive_and_idle(fuzz)
