"""Load a Hugging Face causal LM (local directory or hub id) onto a device.

Only architectures the batched engine is tested with are accepted: their caches
are plain full-attention layers that the engine can pad and concatenate.
Others fail at start-up with a message naming the supported ones.

A wrong --model is the most common first mistake, and transformers' own errors
for it mislead (a missing directory is reported as a malformed hub repo id, an
empty one as a config without model_type). So a local path is checked here
first, and every failure is one ModelLoadError line that names the directory
and what is missing; only what looks like a hub id ("org/name") and is not a
local directory is fetched from the hub. A local directory's weights are
checked here too (a single file, or an index whose every shard is present), so
a missing shard fails before a second process starts to load it.

Besides its EOS ids, a model's generation_config.json carries its authors'
sampling defaults (ModelInfo.generation_defaults); the server applies them to
the parameters a request leaves unset. Its tokenizer carries the chat template
(ModelInfo.chat_template) that Chat renders messages with.

The checks of a --model value that need no torch are in source.py, which the server runs before it
starts anything heavy.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from modelserve.models.capability import unsupported_reason
from modelserve.models.lora import LoraTarget, lora_target
from modelserve.models.quantize import quantize_model, weight_bytes
from modelserve.models.source import ModelLoadError, check_source, one_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationDefaults:
    """The sampling defaults a model's generation_config.json sets (None: it does not set that one), so that
    a request that leaves a parameter unset generates as the model's authors tuned it to."""

    temperature: float | None = None  # 0 = greedy: what `do_sample: false` means
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    min_p: float | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What the frontend knows of a model: its tokenizer and description, without its weights."""

    tokenizer: Tokenizer  # the fast (Rust) tokenizer behind the HF wrapper
    model_id: str
    architecture: str
    model_type: str
    vocab_size: int
    max_sequence_length: int
    eos_token_ids: tuple[int, ...]
    special_tokens: tuple[tuple[str, str, int], ...]  # (role, token, id)
    device: torch.device
    dtype: torch.dtype
    source: str  # what to load the weights from: a local directory or a hub id
    is_demo: bool = False
    revision: str | None = None  # the hub revision the config and tokenizer came from (None: local, or the default)
    generation_defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    chat_template: str | None = None  # the Jinja template Chat renders messages with (None: the model has none)
    lora: LoraTarget | None = None  # what LoRA adapters must fit; None: a family that cannot take them
    # Bytes of the parameters and buffers the model holds on its device, as served (after quantisation);
    # 0 until the weights are loaded (the frontend's info gets it from the engine core).
    weight_bytes: int = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`text`'s token ids. Through `encode_batch`, which lets go of the GIL while the Rust tokenizer works
        (`encode` holds it throughout), so a long prompt tokenized on a worker thread leaves the server's
        event loop running (server/core/serving.py); for one text it costs what `encode` does."""
        (encoding,) = self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
        return list(encoding.ids)


@dataclass(frozen=True)
class LoadedModel(ModelInfo):
    """A model with its weights on its device."""

    model: PreTrainedModel = field(kw_only=True)


def resolve_device(name: str) -> torch.device:
    """auto -> the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {name}: CUDA is not available to this torch ({torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    return device


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16), per /proc/cpuinfo's flags."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"amx_bf16", "avx512_bf16"} & set(flags.split()))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto -> bfloat16 (or float16 where bf16 is unsupported) on CUDA; on a CPU, bfloat16 where it computes
    bf16 natively (half the memory traffic of float32, which bounds a decode step), else float32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if cpu_computes_bf16():
            log.info("--dtype auto: bfloat16, as this CPU computes it natively (AMX or AVX512-BF16)")
            return torch.bfloat16
        log.info("--dtype auto: float32, as this CPU has no native bfloat16 (neither AMX nor AVX512-BF16)")
        return torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ModelLoadError(f"--dtype {name}: expected auto, {', '.join(dtypes)}")
    if name == "bfloat16" and device.type == "cpu" and not cpu_computes_bf16():
        log.warning(
            "--dtype bfloat16 on a CPU with neither AMX nor AVX512-BF16: torch multiplies it on a slow path here, "
            "several times slower than float32 (docs/benchmarks.md); --dtype auto picks float32 on this CPU"
        )
    return dtypes[name]


def load_model_info(
    source: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    model_id: str | None = None,
    revision: str | None = None,
    max_model_len: int = 0,
    trust_remote_code: bool = False,
    is_demo: bool = False,
) -> ModelInfo:
    """Read `source`'s config, tokenizer and generation config (a local model directory, or a hub id at
    `revision` when online), not its weights; `max_model_len` (0 = the model's) caps the context."""
    hf_logging.disable_progress_bar()  # one log line per load, not a progress bar per shard
    requested = source
    source, local = check_source(source)
    if local:
        if revision:
            log.warning("--revision %s is ignored: %s is a local directory, read as it is", revision, source)
            revision = None
    else:
        log.info("%s is not a local directory: fetching it from the Hugging Face hub", source)
    kwargs: dict[str, Any] = dict(local_files_only=local, trust_remote_code=trust_remote_code, revision=revision)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as exc:  # hub errors come in many classes (HTTP, offline, not found, gated)
        if local:
            raise ModelLoadError(f"cannot read the model config in {source}: {one_line(exc)}") from exc
        where = Path(source).expanduser().absolute()
        at = f" at revision {revision!r}" if revision else ""
        raise ModelLoadError(
            f"{source!r} is not a local directory ({where} does not exist) and could not be fetched from the hub"
            f"{at}: {one_line(exc)}"
        ) from exc
    reason = unsupported_reason(config)
    if reason is not None:
        raise ModelLoadError(f"cannot serve {source}: {reason}")
    hf_tokenizer = _load_tokenizer(source, local, kwargs)
    backend = hf_tokenizer.backend_tokenizer
    # A tokenizer.json may switch truncation or padding on (transformers sets them per call of its own
    # wrapper, and leaves them on the Rust tokenizer): served as is, every prompt would be cut to that
    # length, or padded, without a word. A prompt is the caller's whole prompt; its bounds are ours.
    backend.no_truncation()
    backend.no_padding()

    generation = _read_generation_config(source, local, kwargs)
    eos: set[int] = set()
    generation_eos = generation.eos_token_id if generation is not None else None
    for value in (generation_eos, config.eos_token_id, hf_tokenizer.eos_token_id):
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, list):
            eos.update(v for v in value if isinstance(v, int))
    max_len = _context_length(config, hf_tokenizer, max_model_len)
    specials = []
    for role in ("bos", "eos", "pad", "unk"):
        token = getattr(hf_tokenizer, f"{role}_token", None)
        token_id = getattr(hf_tokenizer, f"{role}_token_id", None)
        if isinstance(token, str) and isinstance(token_id, int):
            specials.append((role, token, token_id))
    return ModelInfo(
        tokenizer=backend,
        model_id=model_id or requested,
        architecture=(config.architectures or [config.model_type])[0],
        model_type=config.model_type,
        vocab_size=int(config.vocab_size),
        max_sequence_length=max_len,
        eos_token_ids=tuple(sorted(eos)),
        special_tokens=tuple(specials),
        device=device,
        dtype=dtype,
        source=source,
        is_demo=is_demo,
        revision=revision,
        generation_defaults=_generation_defaults(generation),
        chat_template=_chat_template(hf_tokenizer),
        lora=lora_target(config),
    )


def _chat_template(hf_tokenizer: Any) -> str | None:
    """The tokenizer's chat template; from a dict of named templates, the "default" one (what
    apply_chat_template picks without tools: the others, such as "tool_use", need tools Chat does not send)."""
    template = getattr(hf_tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def _load_tokenizer(source: str, local: bool, kwargs: dict[str, Any]) -> Any:
    """The HF fast tokenizer of `source`; a local directory without tokenizer.json is named as such, since
    that is why its tokenizer fails to load (or loads without the Rust tokenizer the server runs)."""
    no_file = f"model directory {source} has no tokenizer.json: modelserve needs a fast (Rust) tokenizer"
    lacks_file = local and not (Path(source) / "tokenizer.json").is_file()
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        if lacks_file:
            raise ModelLoadError(f"{no_file} ({one_line(exc)})") from exc
        raise ModelLoadError(f"cannot load the tokenizer of {source}: {one_line(exc)}") from exc
    if not isinstance(getattr(hf_tokenizer, "backend_tokenizer", None), Tokenizer):
        raise ModelLoadError(
            no_file if lacks_file else f"{source!r} has no fast tokenizer (tokenizer.json); modelserve needs one"
        )
    return hf_tokenizer


def _read_generation_config(source: str, local: bool, kwargs: dict[str, Any]) -> Any:
    """`source`'s generation_config.json as a GenerationConfig, or None when it has none (most of its
    values are then None: transformers leaves what the file does not set unset)."""
    if local and not (Path(source) / "generation_config.json").is_file():
        return None
    try:
        return GenerationConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:  # OSError: also a hub repo without one
        if local:
            log.warning("ignoring %s: %s", Path(source) / "generation_config.json", one_line(exc))
        else:
            log.info("%s has no usable generation_config.json: %s", source, one_line(exc))
        return None


def _generation_defaults(generation: Any) -> GenerationDefaults:
    """The sampling defaults `generation` (a GenerationConfig or None) sets; `do_sample: false` means greedy,
    whatever temperature it also names (transformers would not sample either)."""
    if generation is None:
        return GenerationDefaults()

    def number(name: str) -> float | None:
        value = getattr(generation, name, None)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    def integer(name: str) -> int | None:
        value = getattr(generation, name, None)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return GenerationDefaults(
        temperature=0.0 if generation.do_sample is False else number("temperature"),
        top_p=number("top_p"),
        top_k=integer("top_k"),
        repetition_penalty=number("repetition_penalty"),
        max_new_tokens=integer("max_new_tokens"),
        min_p=number("min_p"),
    )


def _context_length(config: Any, hf_tokenizer: Any, max_model_len: int) -> int:
    """Most tokens a sequence may hold: the model's own context (its position embeddings, or the
    tokenizer's model_max_length when lower), or `max_model_len` below it; above it is refused, as
    positions past the trained ones give garbage rather than an error."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    own, where = int(positions or 2048), "its config.json" if positions else "the default for a config without one"
    tok_max = getattr(hf_tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < own:
        own, where = tok_max, "its tokenizer's model_max_length"
    if max_model_len == 0:
        return own
    if max_model_len < 2:
        raise ModelLoadError(f"--max-model-len {max_model_len}: use 0 (the model's own context) or at least 2")
    if max_model_len > own:
        raise ModelLoadError(
            f"--max-model-len {max_model_len} is above this model's context of {own} tokens ({where}); "
            f"use at most {own}, or 0 for the model's own"
        )
    log.info(
        "--max-model-len %d: sequences hold at most that many tokens (the model's own context: %d)", max_model_len, own
    )
    return max_model_len


def load_weights(
    info: ModelInfo,
    *,
    trust_remote_code: bool = False,
    quantization: str = "none",
    before_placing: Callable[[nn.Module], None] | None = None,
) -> LoadedModel:
    """Load `info`'s weights onto its device, in its dtype, quantised as `quantization` says (on the device).

    They are loaded on the CPU (views into the mapped safetensors file), `before_placing` changes them there
    (a tensor-parallel rank keeps its shard), and quantize_model places them: with int8 the float linear
    weights never reach the device and none stays alive (see quantize.py)."""
    # In the engine core's process too: one log line per load, not a bar per tensor (the bar's lock is also a
    # multiprocessing semaphore, which the process's quick exit would leave to the resource tracker).
    hf_logging.disable_progress_bar()
    kwargs = dict(local_files_only=Path(info.source).expanduser().is_dir(), trust_remote_code=trust_remote_code)
    try:
        try:  # at the revision the config and tokenizer came from
            model = AutoModelForCausalLM.from_pretrained(
                info.source, dtype=info.dtype, attn_implementation="sdpa", revision=info.revision, **kwargs
            )
        except ValueError as exc:
            if "scaled_dot_product_attention" not in str(exc) and "sdpa" not in str(exc):
                raise
            # Some models cannot run SDPA (Gemma 2: it has no attention soft-capping); they get eager attention.
            log.info("%s does not support SDPA attention; it runs eager attention", info.architecture)
            model = AutoModelForCausalLM.from_pretrained(
                info.source, dtype=info.dtype, attn_implementation="eager", revision=info.revision, **kwargs
            )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the weights of {info.source}: {one_line(exc)}") from exc
    if before_placing is not None:
        before_placing(model)
    quantize_model(model, quantization, info.device)
    model.eval()
    fields = {f: getattr(info, f) for f in info.__dataclass_fields__}
    fields["vocab_size"] = int(model.get_output_embeddings().weight.shape[0])
    fields["weight_bytes"] = weight_bytes(model)
    log.info(
        "weights: %.1f MiB of parameters and buffers on %s (%s%s)",
        fields["weight_bytes"] / 2**20,
        info.device,
        str(info.dtype).removeprefix("torch."),
        ", int8 linear layers" if quantization == "int8" else "",
    )
    if not info.architecture.endswith("ForCausalLM"):
        fields["architecture"] = type(model).__name__
    return LoadedModel(**fields, model=model)


def load_weights_on(
    info: ModelInfo,
    device: str,
    dtype: str,
    *,
    trust_remote_code: bool = False,
    quantization: str = "none",
    before_placing: Callable[[nn.Module], None] | None = None,
) -> LoadedModel:
    """Load `info`'s weights onto the device and in the dtype these flag values (auto included) choose."""
    resolved = resolve_device(device)
    info = dataclasses.replace(info, device=resolved, dtype=resolve_dtype(dtype, resolved))
    return load_weights(
        info, trust_remote_code=trust_remote_code, quantization=quantization, before_placing=before_placing
    )


def load_model(
    source: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    model_id: str | None = None,
    revision: str | None = None,
    max_model_len: int = 0,
    trust_remote_code: bool = False,
    is_demo: bool = False,
) -> LoadedModel:
    """Load `source` (a local model directory, or a hub id at `revision` when online), weights and all."""
    info = load_model_info(
        source,
        device,
        dtype,
        model_id=model_id,
        revision=revision,
        max_model_len=max_model_len,
        trust_remote_code=trust_remote_code,
        is_demo=is_demo,
    )
    return load_weights(info, trust_remote_code=trust_remote_code)
