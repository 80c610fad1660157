"""A prompt's way to token ids: a long one is tokenized on a worker thread, so the frontend's event loop keeps
every other call's stream moving meanwhile (serving.encode_prompt), and the tokenizer lets go of the GIL while
it works (ModelInfo.encode)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from tokenizers import Tokenizer

from modelserve.models.loader import ModelInfo
from modelserve.server.core.serving import ON_LOOP_PROMPT_CHARS, encode_prompt

WAIT_S = 10


class Recording:
    """A model whose encode waits for `release` (set from the event loop) and notes the thread it ran on."""

    def __init__(self, release: threading.Event | None = None) -> None:
        self.release, self.threads = release, list[int]()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.get_ident())
        if self.release is not None:
            assert self.release.wait(WAIT_S), "the event loop never ran while the prompt was tokenized"
        return [len(text), int(add_special_tokens)]


def test_a_long_prompt_is_tokenized_while_the_event_loop_runs() -> None:
    async def main() -> None:
        model = Recording(threading.Event())
        assert model.release is not None
        encoding = asyncio.ensure_future(encode_prompt(cast(Any, model), "x" * (ON_LOOP_PROMPT_CHARS + 1), False))
        await asyncio.sleep(0)  # the task starts; on the loop's own thread its encode would hold the loop here
        model.release.set()  # only the free loop gets here (a blocked loop fails the encode's wait instead)
        assert await asyncio.wait_for(encoding, WAIT_S) == [ON_LOOP_PROMPT_CHARS + 1, 0]
        assert model.threads and model.threads[0] != threading.get_ident()

    asyncio.run(main())


def test_a_short_prompt_is_tokenized_at_once_on_the_loop() -> None:
    async def main() -> None:
        model = Recording()
        assert await encode_prompt(cast(Any, model), "x" * ON_LOOP_PROMPT_CHARS, True) == [ON_LOOP_PROMPT_CHARS, 1]
        assert model.threads == [threading.get_ident()]  # no thread hop for what costs well under a millisecond

    asyncio.run(main())


def test_model_encode_gives_the_tokenizers_own_ids(model_dirs: dict[str, Path]) -> None:
    tokenizer = Tokenizer.from_file(str(model_dirs["llama"] / "tokenizer.json"))
    model = cast(ModelInfo, SimpleNamespace(tokenizer=tokenizer))
    for text in ("", "the cat sat", "naïve 🙂 日本語 " * 500):
        for special in (True, False):
            assert ModelInfo.encode(model, text, special) == tokenizer.encode(text, add_special_tokens=special).ids
