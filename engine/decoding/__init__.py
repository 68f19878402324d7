"""Decoding methods: named policies in one registry, all built on the same model forward.

Importing this package registers every method; look one up with `get_method(name)`.
"""

from . import (  # noqa: F401  (registration side effects)
    dream, fast_dllm, fast_dllm_dream, freecache, guided, llada, streaming, window, window_dream, window_llada,
)
from .options import DecodeOptions
from .registry import METHODS, DecodeResult, Method, get_method, methods_for

__all__ = ["METHODS", "DecodeOptions", "DecodeResult", "Method", "get_method", "methods_for"]
