"""The LoRA adapters a server serves beside its base model, by name: those of --lora-modules, and those loaded
and unloaded at run time (OpenAI's /v1/load_lora_adapter and /v1/unload_lora_adapter as vLLM serves them,
modelserve.v1's LoadLoraAdapter and UnloadLoraAdapter). A request names one as its model (OpenAI's `model`,
modelserve.v1's `adapter`); every face resolves that name here, and is refused here with the same words.

An adapter is checked against the base model (models/lora.py) before the engine core is told of it, so
one that does not fit is refused with what does not fit and the engine never sees it.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

import grpc

from modelserve.config import Config
from modelserve.models.lora import LoraAdapter, LoraError, parse_lora_modules, read_adapter

if TYPE_CHECKING:
    from modelserve.engine.frontend import EngineFrontend as Engine
    from modelserve.models.loader import ModelInfo

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


class AdapterError(Exception):
    """A refused load, unload or choice of adapter: the gRPC code and what the caller is told."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Adapters:
    """The served adapters by name, once attached to the engine and the base model."""

    def __init__(self, config: Config) -> None:
        self.enabled = config.enable_lora or bool(config.lora_modules)
        self.max_rank = config.max_lora_rank
        self.max_loras = config.max_loras
        self.loaded: dict[str, LoraAdapter] = {}
        self._engine: Engine | None = None
        self._model: ModelInfo | None = None
        self._lock = asyncio.Lock()  # one load or unload at a time: a name is checked and taken at once

    def attach(self, engine: Engine, model: ModelInfo) -> None:
        self._engine, self._model = engine, model

    async def load_configured(self, modules: tuple[str, ...]) -> None:
        """--lora-modules' adapters, at start-up; LoraError names the first that does not fit."""
        for name, path in parse_lora_modules(modules):
            try:
                await self.load(name, path)
            except AdapterError as exc:
                raise LoraError(str(exc)) from None

    def resolve(self, model_name: str | None, base: str) -> str:
        """The adapter a request's model name chooses: "" for the base model (or no name), else an adapter's."""
        if not model_name or model_name == base:
            return ""
        if model_name in self.loaded:
            return model_name
        served = [base, *self.loaded]
        raise AdapterError(
            grpc.StatusCode.NOT_FOUND,
            f"the model {model_name!r} does not exist: this server serves {', '.join(map(repr, served))}",
        )

    async def load(self, name: str, path: str) -> LoraAdapter:
        """Check the adapter in directory `path` against the base model and serve it as `name`."""
        engine, model = self._ready()
        if not _NAME.match(name or ""):
            raise AdapterError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the adapter name {name!r} must be 1 to 128 letters, digits, '.', '_', ':', '/' or '-', starting "
                "with a letter or digit",
            )
        if name == model.model_id:
            raise AdapterError(grpc.StatusCode.INVALID_ARGUMENT, f"{name!r} is the base model's name")
        if not path:
            raise AdapterError(grpc.StatusCode.INVALID_ARGUMENT, "the adapter's path is empty")
        target = model.lora
        assert target is not None  # _ready() checked
        async with self._lock:
            if name in self.loaded:
                raise AdapterError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"the LoRA adapter {name!r} is already loaded (from {self.loaded[name].path}); unload it first",
                )
            try:
                adapter = await asyncio.to_thread(read_adapter, name, path, target, self.max_rank)
            except LoraError as exc:
                raise AdapterError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            engine.add_lora(adapter)
            self.loaded[name] = adapter
        return adapter

    async def unload(self, name: str) -> None:
        """Stop serving `name`: requests still waiting for it end; running ones finish with it."""
        engine, _ = self._ready()
        async with self._lock:
            if name not in self.loaded:
                raise AdapterError(
                    grpc.StatusCode.NOT_FOUND,
                    f"no LoRA adapter is loaded as {name!r}; loaded: {', '.join(map(repr, self.loaded)) or 'none'}",
                )
            engine.remove_lora(name)
            del self.loaded[name]

    def _ready(self) -> tuple[Engine, ModelInfo]:
        if not self.enabled:
            raise AdapterError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "LoRA adapters are off: start the server with --enable-lora (or --lora-modules NAME=DIR)",
            )
        if self._engine is None or self._model is None:
            raise AdapterError(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        if self._model.lora is None:
            raise AdapterError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self._model.architecture} cannot take LoRA adapters: they run on modelserve's own forward, "
                "which serves the Llama family (llama, mistral, qwen2, qwen3)",
            )
        return self._engine, self._model
