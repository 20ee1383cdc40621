"""Text and tokens: `text_encoder` and `window_decoder` (a tokenizer's encode and decode, by their
fastest paths) and `TextStream` (incremental detokenisation of one sample that holds back what could
still become a stop string and ends the sample at the first one)."""
import functools
from dataclasses import dataclass, field
from typing import Callable


PROBE = "Probe: Hello, wörld!  12 345\n\tend"


def text_encoder(tokenizer) -> Callable[[str, bool], list[int]]:
    """(text, add_special_tokens) -> ids as `tokenizer(text, add_special_tokens=...)["input_ids"]`; a
    fast tokenizer encodes straight through its Rust backend (half the time a call of transformers'
    wrapper takes) when both give the same ids for a probe text, with and without special tokens."""
    def wrapped(text: str, special: bool = True) -> list[int]:
        return tokenizer(text, add_special_tokens=special)["input_ids"]

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return wrapped

    def direct(text: str, special: bool = True) -> list[int]:
        return backend.encode(text, add_special_tokens=special).ids

    return direct if all(direct(PROBE, s) == wrapped(PROBE, s) for s in (True, False)) else wrapped


def window_decoder(tokenizer) -> Callable[[list[int]], str]:
    """ids -> text as `tokenizer.decode(ids, skip_special_tokens=True)`; a fast tokenizer that cleans up
    no spaces decodes straight through its Rust backend (4x less per call than transformers' wrapper)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return functools.partial(backend.decode, skip_special_tokens=True)
    return functools.partial(tokenizer.decode, skip_special_tokens=True)


@dataclass
class TextStream:
    """Incremental detokenisation of one sample with stop strings.

    A push decodes a window of a few tokens, not the whole output (whose cost grew with its length:
    ~150 us a token at 1,024 tokens, bench/serve_overhead.py). `text` holds the text of `token_ids[:read]`; the window starts at
    `prefix`, the previous boundary, so that rules acting on a decode's first token (SentencePiece's
    leading space) act on both decodes whose difference is the new text. The window moves on when its
    text ends in a whole character; while it ends in U+FFFD (a character whose bytes have not all
    come) it grows instead (an output of invalid UTF-8 only, as random weights write, keeps growing it)."""
    decode: Callable[[list[int]], str]
    stops: list[str]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""                   # decoded text of token_ids[:read]
    prefix: int = 0                  # the window: token_ids[prefix:], of which [prefix:read] is in `text`
    read: int = 0
    emitted: int = 0                 # characters of the decoded text already returned
    stopped: bool = False

    def push(self, new_ids: list[int], final: bool) -> str:
        """Text newly safe to emit after `new_ids` (all of it when `final`)."""
        self.token_ids += new_ids
        window = self.decode(self.token_ids[self.prefix:])
        pending = window[len(self.decode(self.token_ids[self.prefix:self.read])):]
        text = self.text + pending
        if final or not pending.endswith("\ufffd"):
            self.text, self.prefix, self.read = text, self.read, len(self.token_ids)
        cut = min((i for i in (text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(text[:cut])
        if final:
            return self._emit(text)
        hold = max((len(s) - 1 for s in self.stops), default=0)
        safe = len(text) - hold
        while safe > self.emitted and text[safe - 1] == "\ufffd":    # an incomplete UTF-8 character
            safe -= 1
        return self._emit(text[:max(safe, self.emitted)])

    def _emit(self, text: str) -> str:
        new, self.emitted = text[self.emitted:], max(self.emitted, len(text))
        return new
