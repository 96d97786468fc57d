"""A generation's text as it grows, token by token: incremental detokenisation and stop strings.

Two rules make the streamed deltas add up to exactly the text a non-streamed request returns:
- a character split across tokens (byte-level BPE: a partial UTF-8 sequence decodes to U+FFFD) is
  held back until it is complete, as vLLM's incremental detokenizer does with prefix/read offsets;
- any suffix that may begin a stop string is held back until it is known not to (litgpt, vLLM), so
  nothing of a stop string is ever sent, and text before a stop is sent once.

Stops are matched on characters, not tokens: the text ends before the stop string that is complete
first (the earliest end; among those, the earliest start), however the tokens split it.
Pure Python: `decode` is any function from token ids to text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a partial UTF-8 sequence decodes to


class IncrementalDecoder:
    """Token ids in, text deltas out. Each token decodes only a short window of tokens: those since
    the last complete character (`read`), with the window before it (`prefix`) as context, so
    decoders that depend on the previous token (SentencePiece's leading space) stay exact. While
    the window ends in an incomplete character, the characters before it are sent (`sent`) and the
    offsets wait for the character to complete."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # end of the tokens whose text is all sent
        self.sent = 0  # characters sent from the tokens after `read`

    def push(self, token: int) -> str:
        self.ids.append(token)
        before, now = self._window()
        if now.endswith(REPLACEMENT):  # a character still incomplete: send what precedes it
            delta = now.rstrip(REPLACEMENT)[len(before) + self.sent:]
            self.sent += len(delta)
            return delta
        delta = now[len(before) + self.sent:]
        if len(now) > len(before):
            self.prefix, self.read, self.sent = self.read, len(self.ids), 0
        return delta

    def flush(self) -> str:
        """Whatever is still held at the end (an incomplete character shows as U+FFFD, as in a
        decode of every token)."""
        before, now = self._window()
        delta = now[len(before) + self.sent:]
        self.prefix, self.read, self.sent = len(self.ids), len(self.ids), 0
        return delta

    def _window(self) -> tuple[str, str]:
        return self.decode(self.ids[self.prefix:self.read]), self.decode(self.ids[self.prefix:])


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where `text` is cut: the start of the stop string whose first occurrence ends earliest (ties:
    the earliest start), or None when no stop string occurs."""
    best: tuple[int, int] | None = None
    for stop in stops:
        start = text.find(stop) if stop else -1
        if start >= 0 and (best is None or (start + len(stop), start) < best):
            best = (start + len(stop), start)
    return None if best is None else best[1]


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of some stop string:
    what must be held back, since the next characters may complete that stop."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class StopHoldback:
    """Text in, text safe to send out; says when a stop string has been reached."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text to send now, whether a stop string ended the text)."""
        pending = self.held + text
        cut = first_stop(pending, self.stops)
        if cut is not None:
            self.held = ""
            return pending[:cut], True
        keep = stop_prefix_length(pending, self.stops)
        self.held = pending[len(pending) - keep:]
        return pending[:len(pending) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class TextStream:
    """One request's text: push each generated token, send what comes back; close at the end."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]):
        self.decoder = IncrementalDecoder(decode)
        self.holdback = StopHoldback(stops)
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        """(delta to send, whether a stop string ended the text: send nothing after it)."""
        if self.stopped:
            raise RuntimeError("the text already ended at a stop string")
        delta, self.stopped = self.holdback.feed(self.decoder.push(token))
        return delta, self.stopped

    def close(self) -> tuple[str, bool]:
        """The generation ended (length, end of sequence): the rest of the held text, and whether
        it still held a stop string."""
        if self.stopped:
            return "", True
        delta, self.stopped = self.holdback.feed(self.decoder.flush())
        return (delta if self.stopped else delta + self.holdback.flush()), self.stopped
