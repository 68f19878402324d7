"""Tokenizer and chat template of a checkpoint directory, through transformers, without trust_remote_code.

Published DLM checkpoints ship `tokenizer.json` (+ `tokenizer_config.json` with the chat template); some also name
a custom tokenizer class in `auto_map` (Dream). We never run that code: when AutoTokenizer cannot build the class
without it, we load the same `tokenizer.json` as a fast tokenizer and take the special tokens and chat template
from `tokenizer_config.json`.
"""

from __future__ import annotations

import json
import re
import logging
from pathlib import Path

log = logging.getLogger("diffuserve.tokenizer")

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def has_tokenizer(model_dir: str | Path) -> bool:
    d = Path(model_dir)
    return (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        return value.get("content")
    return value


def _fast_fallback(model_dir: Path, cfg: dict):
    from transformers import PreTrainedTokenizerFast

    special = {k: _token_text(cfg[k]) for k in _SPECIAL_KEYS if cfg.get(k)}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), **special)
    if cfg.get("chat_template"):
        tok.chat_template = cfg["chat_template"]
    return tok


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer, or None when the directory has no tokenizer files (token-id-only models)."""
    model_dir = Path(model_dir)
    if not has_tokenizer(model_dir):
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}  # read once, for both paths below
    if cfg.get("tokenizer_class") == "PreTrainedTokenizerFast" and (model_dir / "tokenizer.json").is_file():
        # The class is named, so config.json need not be read: AutoTokenizer reads it and warns on every load that
        # model type `llada` (unknown to transformers) "instantiates a model of type ``".
        return PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        if not (model_dir / "tokenizer.json").is_file():
            raise
        log.info("AutoTokenizer needs remote code for %s (%s); loading tokenizer.json directly", model_dir, exc)
        return _fast_fallback(model_dir, cfg)


def chat_ids(tok, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """A conversation's token ids through the tokenizer's chat template, with the template's own markers the only
    special tokens: a special token's text typed inside a message (`<|eot_id|><|assistant|>`) is read as text, so a
    user cannot forge turns. Without such text the ids are exactly the rendered template's."""
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    specials = [s for s in tok.all_special_tokens if s]
    if not any(s in str(m["content"]) for m in messages for s in specials):
        return tok(text, add_special_tokens=False)["input_ids"]
    # Render once with a placeholder per message to find where the contents go, then tokenize the template's text
    # (markers special) and each content (markers as text) piece by piece.
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
    skeleton = tok.apply_chat_template([{**m, "content": k} for m, k in zip(messages, marks)],
                                       add_generation_prompt=add_generation_prompt, tokenize=False)
    parts = re.split("\ue000(\\d+)\ue001", skeleton)  # template, index, template, index, ..., template
    if sorted(int(i) for i in parts[1::2]) != list(range(len(messages))):
        # The template transforms or repeats the content: it cannot be placed, so refuse rather than guess.
        raise ValueError("a message contains a special token's text, which this chat template cannot take as text")
    ids: list[int] = []
    for j, part in enumerate(parts):
        ids += _content_ids(tok, messages[int(part)]["content"]) if j % 2 else \
            tok(part, add_special_tokens=False)["input_ids"]
    return ids


def _content_ids(tok, content: str) -> list[int]:
    """A message's text as text: special tokens' strings are split like any other text. A vocabulary that holds the
    marker as a plain word (word-level tokenizers) still yields its id: that becomes the unknown token, as any word
    the user may not write."""
    ids = tok(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    unk = tok.unk_token_id
    if unk is None:  # the word-level model's own unknown word, where the config names none
        unk = tok.convert_tokens_to_ids(getattr(tok.backend_tokenizer.model, "unk_token", None) or "") \
            if hasattr(tok, "backend_tokenizer") else None
    special = set(tok.all_special_ids) - {unk}
    if unk is None and special.intersection(ids):
        raise ValueError("a message contains a special token's text, which this tokenizer cannot read as text")
    return [unk if t in special else t for t in ids]


def token_bytes(tok) -> int:
    """An upper bound on the bytes of text one token covers: the longest vocabulary entry in UTF-8 (byte-level
    vocabularies spell a byte as one or two UTF-8 bytes, SentencePiece a space as three: never fewer), plus one for
    a separator some pre-tokenizers drop."""
    return max(len(t.encode("utf-8")) for t in tok.get_vocab()) + 1
