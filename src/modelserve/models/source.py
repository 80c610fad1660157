"""A --model value checked before anything heavy is imported: is it a model directory (config.json with a
model_type, and its weights) or something that reads as a hub id? The server runs check_source() before it
spawns its engine core, so a wrong path is one plain error line within a second, not after seconds of
importing torch and transformers (loader.py calls check_source() too, as it loads)."""

from __future__ import annotations

import json
import re
from pathlib import Path

# The weights transformers looks for in a directory, in its order of preference: a file, or an index of shards.
_WEIGHTS = (
    ("model.safetensors", False),
    ("model.safetensors.index.json", True),
    ("pytorch_model.bin", False),
    ("pytorch_model.bin.index.json", True),
)

# A hub repo id: "name" or "owner/name", letters, digits, "-", "_", "." (no leading "/", ".", "~").
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class ModelLoadError(RuntimeError):
    """The model cannot be served; the message (one line) says why."""


def one_line(exc: BaseException) -> str:
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
        raise ModelLoadError(f"cannot read {config_file}: {one_line(exc)}") from exc
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelLoadError(
            f"{config_file} has no model_type key (such as llama, qwen3, mistral or gemma3_text); "
            "is this a Hugging Face transformers model directory?"
        )


def _check_weights(path: Path) -> None:
    """Fail with a message naming the directory and the missing file unless `path` holds weights that
    transformers will load: the first of _WEIGHTS present, and for an index, every shard it lists."""
    for name, sharded in _WEIGHTS:
        weights = path / name
        if not weights.is_file():
            continue
        if not sharded:
            return
        try:
            shards = sorted(set(json.loads(weights.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"cannot read the shard list (weight_map) of {weights}: {one_line(exc)}") from exc
        missing = [shard for shard in shards if not (path / str(shard)).is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ModelLoadError(
                f"model directory {path} is missing the weights shard {missing[0]}{more} that {name} lists "
                f"({len(missing)} of {len(shards)} shards missing)"
            )
        return
    raise ModelLoadError(
        f"model directory {path} has no weights: expected model.safetensors, or model.safetensors.index.json "
        "and the shards it lists"
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


def check_source(source: str) -> tuple[str, bool]:
    """resolve_source(), then a local directory's weights: ModelLoadError unless `source` could be served as
    far as can be told without torch."""
    resolved, local = resolve_source(source)
    if local:
        _check_weights(Path(resolved))
    return resolved, local
