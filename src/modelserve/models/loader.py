"""Load a Hugging Face causal LM (local directory or hub id) onto a device.

Only architectures the batched engine is tested with are accepted: their caches
are plain full-attention layers that the engine can pad and concatenate.
Others fail at start-up with a message naming the supported ones.

A wrong --model is the most common first mistake, and transformers' own errors
for it mislead (a missing directory is reported as a malformed hub repo id, an
empty one as a config without model_type). So a local path is checked here
first, and every failure is one ModelLoadError line that names the directory
and what is missing; only what looks like a hub id ("org/name") and is not a
local directory is fetched from the hub.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2")


# A hub repo id: "name" or "owner/name", letters, digits, "-", "_", "." (no leading "/", ".", "~").
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class ModelLoadError(RuntimeError):
    """The model cannot be served; the message (one line) says why."""


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (transformers' messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_model_dir(path: Path) -> None:
    """Fail with a plain message unless `path` holds a config.json with a model_type."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"model directory {path} has no config.json: a Hugging Face model directory holds config.json, "
            "the weights (*.safetensors) and tokenizer.json"
        )
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {config_file}: {_one_line(exc)}") from exc
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelLoadError(
            f"{config_file} has no model_type key (supported: {', '.join(SUPPORTED_MODEL_TYPES)}); "
            "is this a Hugging Face transformers model directory?"
        )


def resolve_source(source: str) -> tuple[str, bool]:
    """(what to load, whether it is a local directory) for a --model value; ModelLoadError if hopeless.

    An existing directory is checked for config.json and its model_type; a path that
    does not exist is reported as such, unless it also reads as a hub id.
    """
    if not source.strip():
        raise ModelLoadError("--model is empty: give a model directory or hub id, or leave it unset for the demo model")
    path = Path(source).expanduser()
    if path.is_dir():
        _check_model_dir(path)
        return str(path), True
    if path.exists():
        raise ModelLoadError(f"--model {source}: {path} is a file, not a model directory")
    if _HUB_ID.fullmatch(source) is None:
        raise ModelLoadError(f"model directory {path.absolute()} does not exist")
    return source, False


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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)


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
    return dtypes[name]


def load_model_info(
    source: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    model_id: str | None = None,
    trust_remote_code: bool = False,
    is_demo: bool = False,
) -> ModelInfo:
    """Read `source`'s config and tokenizer (a local model directory, or a hub id when online), not its weights."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one log line per load, not a progress bar per shard
    requested = source
    source, local = resolve_source(source)
    if not local:
        log.info("%s is not a local directory: fetching it from the Hugging Face hub", source)
    kwargs = dict(local_files_only=local, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as exc:  # hub errors come in many classes (HTTP, offline, not found, gated)
        if local:
            raise ModelLoadError(f"cannot read the model config in {source}: {_one_line(exc)}") from exc
        where = Path(source).expanduser().absolute()
        raise ModelLoadError(
            f"{source!r} is not a local directory ({where} does not exist) and could not be fetched from the hub: "
            f"{_one_line(exc)}"
        ) from exc
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model type {config.model_type!r} is not supported yet; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(config, "use_sliding_window", False):
        raise ModelLoadError("sliding-window attention is not supported yet (use_sliding_window=true)")
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {source}: {_one_line(exc)}") from exc
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise ModelLoadError(f"{source!r} has no fast tokenizer (tokenizer.json); modelserve needs one")

    eos: set[int] = set()
    generation_eos = None
    with contextlib.suppress(OSError, ValueError):
        generation_eos = GenerationConfig.from_pretrained(source, **kwargs).eos_token_id
    for value in (generation_eos, config.eos_token_id, hf_tokenizer.eos_token_id):
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, list):
            eos.update(v for v in value if isinstance(v, int))
    max_len = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)
    tok_max = getattr(hf_tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < max_len:
        max_len = tok_max
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
    )


def load_weights(info: ModelInfo, *, trust_remote_code: bool = False) -> LoadedModel:
    """Load `info`'s weights onto its device, in its dtype."""
    kwargs = dict(local_files_only=Path(info.source).expanduser().is_dir(), trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            info.source, dtype=info.dtype, attn_implementation="sdpa", **kwargs
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the weights of {info.source}: {_one_line(exc)}") from exc
    model.to(info.device)
    model.eval()
    fields = {f: getattr(info, f) for f in info.__dataclass_fields__}
    fields["vocab_size"] = int(model.get_output_embeddings().weight.shape[0])
    if not info.architecture.endswith("ForCausalLM"):
        fields["architecture"] = type(model).__name__
    return LoadedModel(**fields, model=model)


def load_weights_on(info: ModelInfo, device: str, dtype: str, *, trust_remote_code: bool = False) -> LoadedModel:
    """Load `info`'s weights onto the device and in the dtype these flag values (auto included) choose."""
    resolved = resolve_device(device)
    info = dataclasses.replace(info, device=resolved, dtype=resolve_dtype(dtype, resolved))
    return load_weights(info, trust_remote_code=trust_remote_code)


def load_model(
    source: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    model_id: str | None = None,
    trust_remote_code: bool = False,
    is_demo: bool = False,
) -> LoadedModel:
    """Load `source` (a local model directory, or a hub id when online), weights and all."""
    info = load_model_info(
        source, device, dtype, model_id=model_id, trust_remote_code=trust_remote_code, is_demo=is_demo
    )
    return load_weights(info, trust_remote_code=trust_remote_code)
