"""The tokenizer files a router asks for (vLLM's GetTokenizer): one ZIP, streamed in chunks, its SHA-256 on
the last one, as vLLM's and SGLang's servicers send it to smg.

A router that cannot read the model directory (another host, another pod) loads its tokenizer from this
bundle, so it holds what the server itself serves with: tokenizer.json as the server loaded it, and
tokenizer_config.json with the chat template in effect (the model's, or --chat-template's) and the special
tokens, plus the model directory's special_tokens_map.json, generation_config.json and config.json where
there is one. Built once per served model.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelserve.models.loader import ModelInfo

CHUNK_BYTES = 512 << 10
_COPIED = ("special_tokens_map.json", "generation_config.json", "config.json")


def bundle(model: ModelInfo) -> tuple[bytes, str]:
    """The ZIP of `model`'s tokenizer files and its SHA-256 (hex)."""
    directory = Path(model.source)
    config: dict[str, Any] = {}
    if (directory / "tokenizer_config.json").is_file():
        config = json.loads((directory / "tokenizer_config.json").read_text())
    for role, token, _ in model.special_tokens:
        config.setdefault(f"{role}_token", token)
    if model.chat_template is not None:
        config["chat_template"] = model.chat_template
    else:
        config.pop("chat_template", None)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("tokenizer.json", model.tokenizer.to_str())
        archive.writestr("tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
        for name in _COPIED:
            if (directory / name).is_file():
                archive.write(directory / name, name)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def chunks(data: bytes, sha256: str) -> Iterator[tuple[bytes, str]]:
    """The bundle in pieces of CHUNK_BYTES, the checksum with the last only."""
    for start in range(0, len(data), CHUNK_BYTES):
        end = min(start + CHUNK_BYTES, len(data))
        yield data[start:end], sha256 if end == len(data) else ""
