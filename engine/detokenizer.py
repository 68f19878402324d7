"""From a canvas to the tokens and text a user sees, at the end (`finish`) and while it fills (`StreamDetokenizer`).

A canvas holds the generation followed by EOS padding (the model fills unused positions with EOS). What counts as
output, as the papers count it, is the tokens before the first stop token; stop strings then cut the text.

Streaming sends only what can never change: the longest settled prefix of the canvas (no mask before it), decoded
as a whole each time so byte-level merges and multi-byte characters come out right, minus a held-back tail (an
incomplete character, or the start of a possible stop string). Every text sent is a prefix of the final text, so
the concatenated stream equals the non-streamed completion.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # generated tokens before the first stop token (or mask, if decoding stopped early)
    text: str
    finish_reason: str  # "stop" (a stop token or string) or "length"


def cut_at_stop(ids: list[int], stop_ids: tuple[int, ...], mask_id: int) -> tuple[list[int], bool]:
    """Tokens up to (not including) the first stop token or leftover mask; True if a stop token ended them."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[:i], True
        if t == mask_id:
            return ids[:i], False
    return list(ids), False


def decode(tokenizer, ids: list[int]) -> str:
    # No clean-up of tokenization spaces: it rewrites text already decoded (" ." -> "."), so a prefix's text would
    # stop being a prefix of the whole's, and a stream could not be equal to the final text.
    if tokenizer is None:
        return ""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def apply_stop_strings(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut at the earliest occurrence of any stop string (the stop string itself is removed)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def finish(ids: list[int], tokenizer, stop_ids: tuple[int, ...], mask_id: int,
           stops: list[str] | None = None) -> Completion:
    kept, stopped = cut_at_stop(ids, stop_ids, mask_id)
    text = decode(tokenizer, kept)
    if stops and tokenizer is not None:
        text, hit = apply_stop_strings(text, stops)
        if hit:
            stopped = True
            # Count only the tokens whose text survives the cut: the shortest prefix that covers it.
            for n in range(len(kept) + 1):
                if len(decode(tokenizer, kept[:n])) >= len(text):
                    kept = kept[:n]
                    break
    return Completion(token_ids=kept, text=text, finish_reason="stop" if stopped else "length")


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that may still change or be cut: an unfinished multi-byte character (the
    decoder shows it as U+FFFD) or the longest tail that begins some stop string."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


class StreamDetokenizer:
    """update(settled ids) -> the new final text; `stopped` once a stop string has been seen."""

    def __init__(self, tokenizer, stops: list[str] | None = None):
        self.tokenizer, self.stops = tokenizer, [s for s in (stops or []) if s]
        self.sent = ""
        self.stopped = False
        self.holding = False  # the last update kept some decoded text back

    def update(self, settled: list[int], final: bool = False) -> str:
        if self.stopped:
            return ""
        text = decode(self.tokenizer, settled)
        if self.stops:
            text, hit = apply_stop_strings(text, self.stops)
            if hit:
                self.stopped = final = True
        hold = 0 if final else _held_back(text, self.stops)
        self.holding = hold > 0
        text = text[: len(text) - hold]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
