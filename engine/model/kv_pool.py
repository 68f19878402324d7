"""KVPool: one paged K/V store shared by every running request of the serving engine.

The pool is a fixed budget of slots (`pages * page_size`), allocated to requests a page at a time. A request's
`KVHandle` maps its absolute positions to pool slots through its page table, so requests of any length pack into
one batched forward: the runner translates every row's position and every key it may see into pool slots, and the
model reads and writes the pool through a `PoolView` with one gather and one scatter per layer, whatever the batch.

Slot 0 is reserved as the scratch slot: padding rows of a ragged batch write there, and padded keys read it (their
attention weight is masked to zero). Pages are freed exactly when a request finishes; `in_use` must be 0 when the
engine is idle.
"""

from __future__ import annotations

import torch


class KVHandle:
    """One request's pages. slots(positions) -> pool slot of each absolute position."""

    def __init__(self, pages: list[int], page_size: int, capacity: int):
        self.pages, self.page_size, self.capacity = pages, page_size, capacity
        self.table = torch.tensor(pages, dtype=torch.long)

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions // self.page_size] * self.page_size + positions % self.page_size


class KVPool:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, pages: int, page_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        # [kv_heads, slots, hd]: index_select along dim 1 gives [kv_heads, K, hd] for one request without a copy
        # into another layout, so a batch of one reads exactly what a private KVCache would.
        shape = (kv_heads, pages * page_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.page_size, self.total_pages = page_size, pages
        self.free_pages = list(range(pages - 1, 0, -1))  # page 0 holds the scratch slot
        self.scratch = 0
        self.bytes_per_page = 2 * layers * kv_heads * page_size * head_dim * self.k[0].element_size()

    @classmethod
    def for_model(cls, model, budget_bytes: int, page_size: int = 16) -> "KVPool":
        s = model.spec
        per_page = 2 * s.num_layers * s.num_kv_heads * page_size * s.head_dim * model.dtype.itemsize
        pages = max(2, budget_bytes // per_page)
        return cls(s.num_layers, s.num_kv_heads, s.head_dim, pages, page_size, model.dtype, model.device)

    def pages_for(self, capacity: int) -> int:
        return -(-capacity // self.page_size)

    def can_allocate(self, capacity: int) -> bool:
        return self.pages_for(capacity) <= len(self.free_pages)

    def fits_at_all(self, capacity: int) -> bool:
        return self.pages_for(capacity) <= self.total_pages - 1

    def allocate(self, capacity: int) -> KVHandle:
        n = self.pages_for(capacity)
        if n > len(self.free_pages):
            raise MemoryError(f"KV pool exhausted: {n} pages wanted, {len(self.free_pages)} free")
        pages = [self.free_pages.pop() for _ in range(n)]
        return KVHandle(pages, self.page_size, capacity)

    def free(self, handle: KVHandle) -> None:
        self.free_pages.extend(reversed(handle.pages))
        handle.pages = []

    @property
    def pages_in_use(self) -> int:
        return self.total_pages - 1 - len(self.free_pages)

    @property
    def bytes_in_use(self) -> int:
        return self.pages_in_use * self.bytes_per_page


class PoolView:
    """The cache interface the model calls (write/read by slot), over the shared pool: slots and keys given to the
    forward are already pool slots (the runner translated them)."""

    def __init__(self, pool: KVPool):
        self.pool = pool
        self.scratch = pool.scratch

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots [B, T]; k, v [B, kv_heads, T, hd]."""
        flat = slots.reshape(-1)
        # [B, kvh, T, hd] -> [kvh, B*T, hd], matching the pool's layout
        kk = k.transpose(0, 1).reshape(k.shape[1], -1, k.shape[3])
        vv = v.transpose(0, 1).reshape(v.shape[1], -1, v.shape[3])
        self.pool.k[layer].index_copy_(1, flat, kk)
        self.pool.v[layer].index_copy_(1, flat, vv)

    def read(self, layer: int, keys: torch.Tensor, key_len: int | None = None):
        """keys [B, K] pool slots -> k, v [B, kv_heads, K, hd]."""
        B, K = keys.shape
        flat = keys.reshape(-1)
        k = self.pool.k[layer].index_select(1, flat)  # [kvh, B*K, hd]
        v = self.pool.v[layer].index_select(1, flat)
        if B == 1:
            return k[None], v[None]
        # [kvh, B*K, hd] -> [B, kvh, K, hd]
        k = k.view(k.shape[0], B, K, k.shape[2]).transpose(0, 1).contiguous()
        v = v.view(v.shape[0], B, K, v.shape[2]).transpose(0, 1).contiguous()
        return k, v
