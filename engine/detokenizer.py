"""From a finished canvas to the tokens and text a user sees.

A canvas holds the generation followed by EOS padding (the model fills unused positions with EOS). What counts as
output, as the papers count it, is the tokens before the first stop token; stop strings then cut the text.
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


def apply_stop_strings(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut at the earliest occurrence of any stop string (the stop string itself is removed)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def finish(ids: list[int], tokenizer, stop_ids: tuple[int, ...], mask_id: int,
           stops: list[str] | None = None) -> Completion:
    kept, stopped = cut_at_stop(ids, stop_ids, mask_id)
    text = tokenizer.decode(kept, skip_special_tokens=True) if tokenizer is not None else ""
    if stops and tokenizer is not None:
        text, hit = apply_stop_strings(text, stops)
        if hit:
            stopped = True
            # Count only the tokens whose text survives the cut: the shortest prefix that covers it.
            for n in range(len(kept) + 1):
                if len(tokenizer.decode(kept[:n], skip_special_tokens=True)) >= len(text):
                    kept = kept[:n]
                    break
    return Completion(token_ids=kept, text=text, finish_reason="stop" if stopped else "length")
