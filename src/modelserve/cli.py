"""`modelserve serve`: flags and MODELSERVE_* environment variables into a Config.

Every Config field is a flag (`--max-batch-size`) and an environment variable
(`MODELSERVE_MAX_BATCH_SIZE`); a flag wins over the environment, which wins
over the default.

A bad environment value is refused exactly like a bad flag (argparse's usage
line, a message naming the variable and what it takes, exit code 2), before
anything is loaded: a typo in a Deployment's env must not end in a traceback,
nor be read silently as "off".
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from modelserve import __version__
from modelserve.config import (
    AUTO_LONG_PREFILL_CHUNK_CPU,
    AUTO_MAX_NUM_BATCHED_TOKENS_CPU,
    AUTO_MAX_NUM_BATCHED_TOKENS_CUDA,
    AUTO_PREFILL_CHUNK_CPU,
    AUTO_PREFILL_CHUNK_CUDA,
    AUTO_WAITING_KV_BUDGETS,
    DEFAULT_CPU_KV_BYTES,
    DEFAULT_MAX_NEW_TOKENS,
    LOG_FORMAT,
    QUANTIZATIONS,
    STOP_SIGNALS,
    TOOL_CALL_PARSERS,
    Config,
)

_HELP = {
    "model": "local Hugging Face model directory or hub id (default: the embedded demo model, random text)",
    "served_model_name": "the model id that ModelInfo, Health and the metrics report (default: the --model value)",
    "revision": "hub branch, tag or commit of --model to load (default: the main branch; "
    "ignored, with a warning, for a local directory)",
    "max_model_len": "most tokens (prompt + output) a sequence may hold, to cap the model's context "
    "(0 = the model's own; a larger value is refused at start-up)",
    "chat_template": "Jinja chat template file that Chat renders messages with, in place of the model's own "
    "(default: the model's; without either, Chat answers FAILED_PRECONDITION)",
    "tool_call_parser": "how a chat reply's tool calls are read: auto (from the chat template: Mistral's "
    "[TOOL_CALLS], Llama 3's <|python_tag|>, else Hermes' <tool_call> as Qwen writes) | hermes | llama3_json "
    "| mistral",
    "host": "address to listen on",
    "port": "port to listen on (gRPC)",
    "http_port": "port of the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, "
    "/health) and the chat page at /, on --host (0 = off)",
    "device": "auto | cpu | cuda | cuda:N",
    "dtype": "auto (bf16/fp16 on CUDA; bf16 on a CPU with AMX or AVX512-BF16, else fp32) "
    "| float32 | bfloat16 | float16",
    "quantization": "none | int8: int8 keeps the linear layers' weights as int8 with one scale per output "
    "channel (a quarter of their float32 bytes); the LM head and embeddings stay in --dtype",
    "max_batch_size": "most sequences decoded together in one step",
    "prefill_chunk_tokens": "tokens of each prompt prefilled per step while streams run "
    f"(0 = auto: {AUTO_PREFILL_CHUNK_CPU} on CPU, {AUTO_PREFILL_CHUNK_CUDA} on CUDA)",
    "long_prefill_chunk_tokens": "tokens of each prompt with over four prefill chunks to compute fed per step while "
    "streams run (at most --prefill-chunk-tokens): smaller keeps the streams smoother while a long prompt is "
    f"prefilled, larger gives it its first token sooner (0 = auto: {AUTO_LONG_PREFILL_CHUNK_CPU} on CPU; "
    "on CUDA the prefill chunk)",
    "max_num_batched_tokens": "most tokens one step's single forward takes: every decoding row's next token "
    f"plus the chunks of the prompts being prefilled (0 = auto: {AUTO_MAX_NUM_BATCHED_TOKENS_CPU} on CPU, "
    f"{AUTO_MAX_NUM_BATCHED_TOKENS_CUDA} on CUDA)",
    "kv_cache_bytes": "KV cache budget in bytes, of each rank with --tensor-parallel-size "
    f"(0 = auto: gpu_memory_fraction of free GPU memory, {DEFAULT_CPU_KV_BYTES >> 30} GiB on CPU)",
    "gpu_memory_fraction": "share of the GPU memory free after loading that the KV cache may use",
    "enforce_eager": "on CUDA, run decode steps eagerly instead of replaying CUDA graphs (for debugging)",
    "tensor_parallel_size": "split the model over this many ranks, one process per device (cuda:0..N-1 on a GPU "
    "machine, NCCL; the CPU's cores shared out on one without, gloo): each holds its share of the attention heads "
    "and of the MLP; Llama-family models on modelserve's own forward, not with --quantization int8 or LoRA",
    "enable_lora": "serve LoRA adapters beside the base model, chosen per request by name (the OpenAI `model`, "
    "modelserve.v1's `adapter`) and loaded at run time (/v1/load_lora_adapter); Llama-family models only",
    "lora_modules": "LoRA adapters to serve from the start, as NAME=DIR (a PEFT adapter directory) items; "
    "implies --enable-lora",
    "max_loras": "LoRA adapters resident at once: a batch mixes at most this many; a request for another waits for "
    "a slot no running request uses",
    "max_lora_rank": "the largest LoRA rank accepted (the slots' size: memory and work grow with it)",
    "profile_dir": "directory the vLLM face's StartProfile / StopProfile (smg's /start_profile, /stop_profile) "
    "write torch profiler traces of the engine's steps to (empty = those calls are refused)",
    "prefix_caching": "reuse the keys and values an earlier prompt computed for the same start (a shared system "
    "prompt, a chat's history) instead of prefilling it again; the cache is the KV memory's own blocks: "
    "a finished request's blocks stay cached until new tokens need them",
    "own_forward": "run the Llama family (llama, mistral, qwen2, qwen3) and GPT-2 on modelserve's own forwards: "
    "fused projections, a precomputed rotary table, paged attention (off: transformers' forward for every model)",
    "default_max_new_tokens": "max_new_tokens when a request leaves it unset "
    f"(0 = the model's generation_config.json max_new_tokens, else {DEFAULT_MAX_NEW_TOKENS})",
    "max_max_new_tokens": "the largest max_new_tokens a request may ask for",
    "max_prompt_bytes": "largest prompt, in UTF-8 bytes",
    "max_prompt_tokens": "largest prompt in tokens (0 = the model's context less one)",
    "max_waiting_requests": "most requests queued for a batch slot; more get RESOURCE_EXHAUSTED with a retry hint",
    "max_waiting_tokens": "most prompt tokens queued (what a request needs of the KV memory to start); "
    f"0 = {AUTO_WAITING_KV_BUDGETS} times the KV cache budget",
    "max_batch_requests": "most items in one BatchGenerate",
    "max_stop_sequences": "most stop sequences (and stop token ids) per request",
    "max_stop_sequence_chars": "longest stop sequence, in characters",
    "max_top_logprobs": "largest top_logprobs a request may ask for",
    "max_message_bytes": "largest gRPC message, in bytes",
    "telemetry": "OpenTelemetry metrics and traces (and the /metrics endpoint)",
    "trace_content": "record prompt and output text on request spans (off by default: they may be private)",
    "log_content": "log each request's prompt and output (off by default: they may be private)",
    "metrics_port": "port of the Prometheus /metrics endpoint (0 = off)",
    "metrics_host": "address of the /metrics endpoint (empty = the same as --host)",
    "vllm_metrics": "also export vllm:num_requests_waiting, vllm:num_requests_running, vllm:kv_cache_usage_perc "
    "and vllm:cache_config_info on /metrics, the names LLM routers (the Gateway API Inference Extension's "
    "endpoint picker) read by default",
    "reflection": "serve gRPC server reflection",
    "warmup": "run one generation before reporting SERVING",
    "grace_s": "seconds running streams may finish after SIGTERM",
    "max_connection_age_s": "seconds after which a connection is asked to close (GOAWAY) so that clients "
    "re-resolve DNS and rebalance over the replicas; streams running on it still finish (0 = never)",
    "tls_cert_file": "PEM certificate chain; with --tls-key-file the server speaks TLS only",
    "tls_key_file": "PEM private key for --tls-cert-file",
    "tls_client_ca_file": "PEM CA bundle: require client certificates signed by it (mutual TLS)",
    "auth_token": "bearer token every call must carry (prefer the env var or --auth-token-file: flags show in ps)",
    "auth_token_file": "file holding the bearer token",
    "auth_health": "require the token for health and reflection too (off: probes work without it)",
    "cache_dir": "where the demo model is built and kept",
    "trust_remote_code": "allow model code from the model directory (only for models you trust)",
    "log_level": "DEBUG | INFO | WARNING | ERROR",
}


#: Never shown as a `--help` default: the value may come from the environment.
_SECRET_FIELDS = frozenset({"auth_token"})


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.dest in _SECRET_FIELDS:
            return action.help
        return super()._get_help_string(action)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _InvalidEnv:
    """The default of a flag whose environment variable holds a bad value: an error once it is used."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __str__(self) -> str:  # what --help shows as the default
        return f"<invalid: {self.message}>"


def _env_default(field: dataclasses.Field[Any]) -> Any:
    name = f"MODELSERVE_{field.name.upper()}"
    raw = os.environ.get(name)
    if raw is None:
        return field.default
    kind: Any = type(field.default) if field.default is not None else str
    if kind is bool:
        value = raw.strip().lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        return _InvalidEnv(f"{name}={raw!r}: use one of 1/0, true/false, yes/no, on/off")
    if kind is int:
        try:
            return int(raw.strip())
        except ValueError:
            return _InvalidEnv(f"{name}={raw!r} is not an integer")
    if kind is float:
        try:
            return float(raw.strip())
        except ValueError:
            return _InvalidEnv(f"{name}={raw!r} is not a number")
    if kind is tuple:  # a list flag: its items separated by spaces
        return tuple(raw.split())
    return kind(raw)


def _build_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `modelserve` parser and its `serve` subparser."""
    parser = argparse.ArgumentParser(prog="modelserve", description="Serve a causal language model over gRPC.")
    parser.add_argument("--version", action="version", version=f"modelserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the gRPC server", formatter_class=_HelpFormatter)
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        default = _env_default(field)
        help_text = f"{_HELP[field.name]} [env MODELSERVE_{field.name.upper()}]"
        if isinstance(field.default, bool):
            serve.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif isinstance(field.default, tuple):
            serve.add_argument(flag, nargs="*", default=default, help=help_text)
        else:
            kind: Any = type(field.default) if field.default is not None else str
            serve.add_argument(flag, type=kind, default=default, help=help_text)
    return parser, serve


def build_parser() -> argparse.ArgumentParser:
    return _build_parsers()[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags over the environment; a bad value of either exits 2 with argparse's message."""
    parser, serve = _build_parsers()
    ns = parser.parse_args(argv)
    for field in dataclasses.fields(Config):
        value = getattr(ns, field.name)
        if isinstance(value, _InvalidEnv):  # the flag was not given, so the bad variable would be used
            serve.error(value.message)
    if ns.log_level.upper() not in _LOG_LEVELS:
        serve.error(f"--log-level / MODELSERVE_LOG_LEVEL {ns.log_level!r}: use one of {', '.join(_LOG_LEVELS)}")
    if ns.quantization not in QUANTIZATIONS:
        serve.error(
            f"--quantization / MODELSERVE_QUANTIZATION {ns.quantization!r}: use one of {', '.join(QUANTIZATIONS)}"
        )
    for name in ("prefill_chunk_tokens", "long_prefill_chunk_tokens", "max_num_batched_tokens"):
        if getattr(ns, name) < 0:
            flag = "--" + name.replace("_", "-")
            serve.error(f"{flag} / MODELSERVE_{name.upper()} {getattr(ns, name)}: use 0 (auto) or more")
    if ns.tool_call_parser not in TOOL_CALL_PARSERS:
        serve.error(
            f"--tool-call-parser / MODELSERVE_TOOL_CALL_PARSER {ns.tool_call_parser!r}: use one of "
            f"{', '.join(TOOL_CALL_PARSERS)}"
        )
    return ns


def config_from_args(ns: argparse.Namespace) -> Config:
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(Config)}
    values["cache_dir"] = Path(values["cache_dir"])
    values["lora_modules"] = tuple(values["lora_modules"])
    return Config(**values)


class _EarlyStop:
    """A SIGTERM or Ctrl-C that comes before serve() handles them (while the server and the engine core import):
    recorded, not fatal, so that serve() begins its drain with it and the server still exits 0.

    A handler, not a blocked signal mask: spawning the core starts multiprocessing's resource tracker, which
    unblocks SIGINT and SIGTERM after it."""

    def __init__(self) -> None:
        self._received = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: object) -> None:
        self._received = True

    def received(self) -> bool:
        return self._received


def main(argv: list[str] | None = None) -> None:
    early_stop = _EarlyStop()
    ns = parse_args(argv)
    config = config_from_args(ns)
    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    if config.model is not None:  # refused before anything heavy starts: one plain line, exit 1
        from modelserve.models.source import ModelLoadError, check_source

        try:
            check_source(config.model)
        except ModelLoadError as exc:
            logging.getLogger("modelserve").error("could not load the model: %s", exc)
            sys.exit(1)
    from modelserve.engine.core_spawn import CoreProcess

    core = CoreProcess()  # first: its imports (torch, transformers) run beside this process's own
    from modelserve.process_exit import exit_now
    from modelserve.server.app import serve

    exit_now(asyncio.run(serve(config, core, early_stop.received)))
