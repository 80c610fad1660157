"""Stop-sequence matching over streamed text, with hold-back.

Hand-written because no library does the streaming half: text that might still
grow into a stop sequence must not reach the caller until it cannot, or a stop
sequence split across tokens would leak its first half.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopMatch:
    text: str  # settled text to emit now
    stopped: bool  # a stop sequence ended the output
    stop: str = ""  # which one, when stopped


class StopSequenceMatcher:
    """Feed it decoded text; it returns what is safe to emit."""

    def __init__(self, stops: tuple[str, ...], include_stop: bool = False) -> None:
        self._stops = tuple(s for s in stops if s)
        self._include = include_stop
        self._held = ""

    def push(self, text: str) -> StopMatch:
        if not self._stops:
            return StopMatch(text, False)
        buf = self._held + text
        first = -1
        matched = ""
        for stop in self._stops:
            at = buf.find(stop)
            if at != -1 and (first == -1 or at < first or (at == first and len(stop) > len(matched))):
                first, matched = at, stop
        if first != -1:
            self._held = ""
            end = first + len(matched) if self._include else first
            return StopMatch(buf[:end], True, matched)
        keep = self._longest_stop_prefix_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return StopMatch(buf[: len(buf) - keep], False)

    def flush(self) -> str:
        """The output ended another way: what was held back is plain text after all."""
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_suffix(self, buf: str) -> int:
        """Length of the longest end of `buf` that begins some stop sequence."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
