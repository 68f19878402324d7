"""Model runtime: checkpoint spec, loader, the shared transformer with its partial forward, and the KV cache."""

from .kv_cache import KVCache
from .loader import DTYPES, load_model, published_names
from .spec import DREAM, LLADA, ModelSpec, load_spec
from .transformer import AttnGroup, DiffusionLM, ForwardBatch, Ragged, span_forward

__all__ = ["AttnGroup", "DTYPES", "DREAM", "LLADA", "DiffusionLM", "ForwardBatch", "KVCache", "ModelSpec", "Ragged",
           "load_model", "load_spec", "published_names", "span_forward"]
