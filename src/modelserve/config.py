"""Every limit and default of a modelserve process, in one frozen Config.

The CLI fills it from flags and MODELSERVE_* environment variables; nothing else
reads flags or the environment.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path


def default_cache_dir() -> Path:
    """Where the demo model is built once and kept ($XDG_CACHE_HOME/modelserve)."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "modelserve"


# Every process of a server logs in this format (the tests' harness parses it).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The signals that begin a server's drain (Kubernetes sends SIGTERM; Ctrl-C is SIGINT).
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})

# The "0 = auto" values, written once; the engine resolves them and the CLI's help quotes them.
DEFAULT_CPU_KV_BYTES = 4 << 30  # KV budget on CPU when kv_cache_bytes is 0
# On a CPU a prompt token costs about what a decode step's token does, so a small chunk keeps
# running streams' inter-token latency within a few times its median while a long prompt is
# admitted. On a GPU a chunk of a few hundred tokens costs little more than a decode step.
AUTO_PREFILL_CHUNK_CPU = 128
AUTO_PREFILL_CHUNK_CUDA = 512
# Of each prompt with over four chunks to compute, this many tokens a step while streams decode. On a CPU a
# step that carries 32 prompt tokens beside 16 decoding rows of gpt2-small lasts under twice their decode-only
# step (128 tokens: about 3.5 times in fp32, 2.7 in bf16); the long prompt waits 2.2-2.6 times as long for
# its first token (docs/benchmarks.md, eighth pass). On a GPU they are fed a chunk each, like any prompt.
AUTO_LONG_PREFILL_CHUNK_CPU = 32
# All of a step's tokens: its decoding rows and the chunks of the prompts it prefills (vLLM's defaults for
# its OpenAI server on a CPU and on a GPU). Prompts that arrive together start together within it: 32
# prompts of 16-256 tokens sent at once are all prefilled in 3 steps, where a chunk for the whole step took 29.
AUTO_MAX_NUM_BATCHED_TOKENS_CPU = 2048
AUTO_MAX_NUM_BATCHED_TOKENS_CUDA = 8192
# The default queue holds this many full KV caches' worth of work: enough to keep the batch full
# through a burst, little enough that a queued request still starts within a few batch lifetimes.
AUTO_WAITING_KV_BUDGETS = 4
# Tokens per KV block: the unit of KV allocation and of prefix-cache reuse (vLLM's default too). Smaller
# reuses more of a partly shared prefix; larger means fewer blocks to look up and hash.
KV_BLOCK_TOKENS = 16
# max_new_tokens for a request that leaves it unset, unless the flag or the model's generation_config.json sets one.
DEFAULT_MAX_NEW_TOKENS = 256
# --quantization values: "none" keeps the weights as loaded; "int8" is weight-only int8 (models/quantize.py).
QUANTIZATIONS = ("none", "int8")
TOOL_CALL_PARSERS = ("auto", "hermes", "llama3_json", "mistral")  # auto: the one the chat template's tokens say


@dataclass(frozen=True)
class Config:
    """What one server runs and the limits it enforces."""

    model: str | None = None  # local HF model dir or hub id; None = the embedded demo model
    served_model_name: str = ""  # the model id ModelInfo, Health and telemetry report; "" = the --model value
    revision: str = ""  # hub branch, tag or commit of --model; "" = the default branch; ignored for a local directory
    max_model_len: int = 0  # most tokens (prompt + output) a sequence holds; 0 = the model's context; above it: refused
    chat_template: str = ""  # Jinja file Chat renders messages with, in place of the model's own; "" = the model's
    tool_call_parser: str = "auto"  # one of TOOL_CALL_PARSERS: how a chat reply's tool calls are read
    host: str = "0.0.0.0"
    port: int = 50051
    http_port: int = 8000  # OpenAI-compatible HTTP API and chat page, on host; 0 = off
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    quantization: str = "none"  # one of QUANTIZATIONS: none | int8 (weight-only, per output channel)
    max_batch_size: int = 32  # sequences decoded together in one step
    prefill_chunk_tokens: int = 0  # of each prompt per step while streams run; 0 = AUTO_PREFILL_CHUNK_*
    long_prefill_chunk_tokens: int = 0  # of each prompt over 4 chunks per step while streams run; 0 = AUTO_LONG_*
    max_num_batched_tokens: int = 0  # most tokens one step's forward takes, all rows together; 0 = AUTO_MAX_NUM_*
    kv_cache_bytes: int = 0  # KV memory budget; 0 = gpu_memory_fraction of free GPU memory, DEFAULT_CPU_KV_BYTES on CPU
    gpu_memory_fraction: float = 0.9
    enforce_eager: bool = False  # on CUDA, decode without CUDA graphs
    tensor_parallel_size: int = 1  # ranks (processes, one per device) the model's layers are split over
    enable_lora: bool = False  # LoRA adapters chosen per request (--lora-modules turns it on)
    lora_modules: tuple[str, ...] = ()  # NAME=DIR of each PEFT LoRA adapter loaded at start-up
    max_loras: int = 4  # adapters resident on the device at once (more are loaded into a slot as needed)
    max_lora_rank: int = 16  # the largest adapter rank accepted
    profile_dir: str = ""  # where StartProfile writes the engine's step traces; "" = profiling refused
    prefix_caching: bool = True  # reuse the keys and values of prompt prefixes seen before
    own_forward: bool = True  # the Llama family (llama, mistral, qwen2, qwen3) and GPT-2 on modelserve's own forwards
    default_max_new_tokens: int = 0  # 0 = the model's generation_config.json's, else DEFAULT_MAX_NEW_TOKENS
    max_max_new_tokens: int = 4096
    max_prompt_bytes: int = 1 << 20
    max_prompt_tokens: int = 0  # 0 = the model's context (less one token to generate)
    max_waiting_requests: int = 256  # requests queued for a batch slot; past it: RESOURCE_EXHAUSTED
    max_waiting_tokens: int = 0  # prompt tokens queued; 0 = AUTO_WAITING_KV_BUDGETS x the KV budget
    max_batch_requests: int = 256  # items in one BatchGenerate
    max_stop_sequences: int = 16
    max_stop_sequence_chars: int = 256
    max_top_logprobs: int = 20
    max_message_bytes: int = 4 << 20  # gRPC receive/send limit
    telemetry: bool = True  # metrics, traces and their exporters; off measures their cost
    trace_content: bool = False  # put prompt and output text on request spans (off: counts only)
    log_content: bool = False  # log each request's prompt and output (off: ids and counts only)
    metrics_port: int = 9464  # Prometheus scrape endpoint (/metrics); 0 = off
    metrics_host: str = ""  # "" = the same as host
    vllm_metrics: bool = True  # the load gauges under vLLM's names too, for LLM routers (telemetry/vllm_aliases.py)
    reflection: bool = True
    warmup: bool = True
    grace_s: float = 30.0  # how long running streams may finish after SIGTERM
    # A connection is told to go (GOAWAY) when this old, so that clients re-resolve DNS and reach new
    # replicas; its running streams still finish (server/app.py says why). 0 = connections never age out.
    max_connection_age_s: float = 300.0
    tls_cert_file: str = ""  # PEM certificate chain; with tls_key_file turns TLS on
    tls_key_file: str = ""  # PEM private key
    tls_client_ca_file: str = ""  # PEM CA bundle; set = mutual TLS (clients must present a certificate it signed)
    # The bearer token callers must send (kept out of repr); prefer MODELSERVE_AUTH_TOKEN or auth_token_file.
    auth_token: str = field(default="", repr=False)
    auth_token_file: str = ""  # file holding the bearer token (one line)
    auth_health: bool = False  # also require the token for health and reflection (off: probes work without it)
    cache_dir: Path = default_cache_dir()  # noqa: RUF009 (the default is read once, at import)
    trust_remote_code: bool = False
    log_level: str = "INFO"
