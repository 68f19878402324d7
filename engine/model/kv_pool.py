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
    """One request's pages; slot_map[position] is the pool slot of each absolute position."""

    def __init__(self, pages: list[int], page_size: int, capacity: int):
        self.pages, self.page_size, self.capacity = pages, page_size, capacity
        table = torch.tensor(pages, dtype=torch.long)
        # [pages, page_size] -> [pages * page_size]: the slot of every position (the runner indexes it in numpy)
        self.slot_map = (table[:, None] * page_size + torch.arange(page_size)).reshape(-1).numpy()


class KVPool:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, pages: int, page_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        # [slots, kv_heads * hd]: a slot is one contiguous row, so gathering a batch's keys is one row gather
        # (measured 2.5x faster than gathering along the slot axis of [kv_heads, slots, hd] and re-laying it out).
        shape = (pages * page_size, kv_heads * head_dim)
        self.kv_heads, self.head_dim = kv_heads, head_dim
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
        return cls._of(model, max(2, budget_bytes // per_page), page_size)

    @classmethod
    def for_requests(cls, model, capacities: list[int], page_size: int = 16) -> "KVPool":
        """Exactly enough pages to hold these requests at once, plus the scratch page (benchmarks: zero-filling a
        fixed large pool per run costs more than the run)."""
        return cls._of(model, 1 + sum(-(-c // page_size) for c in capacities), page_size)

    @classmethod
    def _of(cls, model, pages: int, page_size: int) -> "KVPool":
        s = model.spec
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
    def usable_pages(self) -> int:
        return self.total_pages - 1  # less the scratch page

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
        # [B, kvh, T, hd] -> [B*T, kvh*hd], one pool row per (request, position)
        self.pool.k[layer].index_copy_(0, flat, k.transpose(1, 2).reshape(flat.shape[0], -1))
        self.pool.v[layer].index_copy_(0, flat, v.transpose(1, 2).reshape(flat.shape[0], -1))

    def write_rows(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots [N]; k, v [N, kv_heads * hd]: packed rows, one pool row each (no padding rows to skip)."""
        self.pool.k[layer].index_copy_(0, slots, k)
        self.pool.v[layer].index_copy_(0, slots, v)

    def read(self, layer: int, keys: torch.Tensor, key_len: int | None = None):
        """keys [B, K] pool slots -> k, v [B, kv_heads, K, hd] (a strided view: SDPA reads it as it is)."""
        B, K = keys.shape
        flat = keys.reshape(-1)
        shape = (B, K, self.pool.kv_heads, self.pool.head_dim)
        k = self.pool.k[layer].index_select(0, flat).view(shape).transpose(1, 2)
        v = self.pool.v[layer].index_select(0, flat).view(shape).transpose(1, 2)
        return k, v
