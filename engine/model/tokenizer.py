"""Tokenizer and chat template of a checkpoint directory, through transformers, without trust_remote_code.

Published DLM checkpoints ship `tokenizer.json` (+ `tokenizer_config.json` with the chat template); some also name
a custom tokenizer class in `auto_map` (Dream). We never run that code: when AutoTokenizer cannot build the class
without it, we load the same `tokenizer.json` as a fast tokenizer and take the special tokens and chat template
from `tokenizer_config.json`.
"""

from __future__ import annotations

import json
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
