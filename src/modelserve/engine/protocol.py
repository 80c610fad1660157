"""The messages between the frontend and the engine core.

In: a request, an abort, an acknowledgement of a step, a shutdown. Out: ONE
StepOutput per step, carrying every row's new token (and its log-probabilities
when asked) and every row that finished. The core sends token ids only; text,
stop strings and logprob token strings are the frontend's work.

msgspec Structs, because when the core runs in its own process (core_process.py)
they are msgpack-encoded and decoded in microseconds, with their types checked;
the in-process engine hands the same objects over without encoding them.
"""

from __future__ import annotations

import msgspec

from modelserve.engine.request import EngineStats, FinishReason, Request, StepRecord


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    key: int
    request: Request


class Abort(msgspec.Struct, tag=True, array_like=True):
    key: int
    reason: FinishReason
    error: str = ""


class AbortAll(msgspec.Struct, tag=True, array_like=True):
    reason: FinishReason
    error: str


class FlushCache(msgspec.Struct, tag=True, array_like=True):
    """Drop the prefix cache's blocks that no running request holds (at the next step)."""


# StartProfile's activities: what the profiler records (GPU and CUDA name the same), and MEM, its memory.
PROFILE_ACTIVITIES = ("CPU", "GPU", "CUDA")
PROFILE_MEMORY = "MEM"


class StartProfile(msgspec.Struct, tag=True, array_like=True):
    """Profile the steps (step_profiler.py) into the Chrome trace at `path`."""

    path: str
    start_step: int = 0  # steps to wait before starting
    num_steps: int = 0  # steps to profile; 0 = until StopProfile
    activities: list[str] = []  # CPU, GPU (CUDA), MEM; none = CPU and, where there is one, the GPU
    with_stack: bool = False
    record_shapes: bool = False


class StopProfile(msgspec.Struct, tag=True, array_like=True):
    """End the profile and write its trace."""


class AddLora(msgspec.Struct, tag=True, array_like=True):
    """Make a LoRA adapter (checked by the frontend, models/lora.py) available to requests by its name."""

    name: str
    path: str
    rank: int
    scaling: float
    modules: list[str]


class RemoveLora(msgspec.Struct, tag=True, array_like=True):
    """Unload an adapter: requests still waiting for it end; running ones finish with it."""

    name: str


class Ack(msgspec.Struct, tag=True, array_like=True):
    """The frontend has taken in step `step`'s output (the core never runs more than one step ahead)."""

    step: int


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


Command = (
    AddRequest | Abort | AbortAll | FlushCache | StartProfile | StopProfile | AddLora | RemoveLora | Ack | Shutdown
)


class RowOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """One row's news from one step: a token, a finish, or both."""

    key: int
    token_id: int = -1  # -1: no token this step (the row ended without one)
    logprob: float | None = None  # the token's raw log-probability, when logprobs or confidence are tracked
    top_ids: list[int] | None = None  # the most likely tokens at this step, when asked
    top_logprobs: list[float] | None = None
    finish: FinishReason | None = None
    error: str = ""  # why, for an ERROR, OUT_OF_MEMORY or a server-side CANCELLED
    cached_tokens: int = 0  # with a row's first token: its prompt tokens that came from the prefix cache
    # With a row's first token, when its request asks for prompt log-probabilities: for prompt tokens 1..
    prompt_logprobs: list[float] | None = None
    prompt_ranks: list[int] | None = None
    prompt_top_ids: list[list[int]] | None = None
    prompt_top_logprobs: list[list[float]] | None = None


class KvStored(msgspec.Struct, tag=True, array_like=True):
    """A full block entered the prefix cache: its key (chaining its parent's and its tokens) and tokens."""

    key: int
    parent: int  # block_manager.NO_KEY for a sequence's first block
    tokens: list[int]
    lora: str = ""  # the LoRA adapter its keys and values were computed with ("" = the base model)


class KvRemoved(msgspec.Struct, tag=True, array_like=True):
    """Cached blocks left the prefix cache (taken for new tokens, or flushed)."""

    keys: list[int]


KvEvent = KvStored | KvRemoved


class StepOutput(msgspec.Struct, tag=True, array_like=True):
    step: int
    rows: list[RowOutput]
    admitted: list[int]  # keys that left the waiting queue for a batch row this step
    stats: EngineStats
    record: StepRecord | None  # None for a step that ran no model work
    kv_events: list[KvEvent] = []  # the prefix cache's changes since the last output, in order


class CoreReady(msgspec.Struct, tag=True, array_like=True):
    """The core process loaded its model and sized its KV memory."""

    vocab_size: int
    max_sequence_tokens: int
    kv_budget_tokens: int
    device: str
    dtype: str
    weight_bytes: int  # the model's parameters and buffers on its device, after quantisation


class CoreFailed(msgspec.Struct, tag=True, array_like=True):
    """The core process could not start (its error, one line)."""

    error: str


CoreMessage = StepOutput | CoreReady | CoreFailed
