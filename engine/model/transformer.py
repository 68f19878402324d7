"""The bidirectional transformer both families share, with the partial forward every accelerator needs.

One forward computes a chosen set of query rows per request (token ids at explicit absolute positions), writes
their post-RoPE K/V into a per-request KVCache, attends to any subset of cached keys, and returns logits only for
the rows asked for. A plain full forward is the special case "all positions, attend to all".

Numerics follow the published model code exactly (see tests/fixtures/parity/REFERENCE_NOTES.md): RMSNorm in
float32, LLaDA rotates q/k in float32, Dream builds cos/sin in float32 and rotates in the working dtype, SDPA with
no mask when every key is visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import KVCache
from .spec import LLADA, ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Both reference codes normalise in float32 whatever the weights' dtype, then cast back.
        y = x.to(torch.float32)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class Rope(nn.Module):
    """Rotary embedding at explicit (possibly non-contiguous) absolute positions."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        d = spec.head_dim
        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.full_precision = spec.family == LLADA

    def tables(self, positions: torch.Tensor, dtype: torch.dtype, full_precision: bool | None = None):
        """positions [B, T] -> cos, sin [B, 1, T, head_dim]; a product per element, so any length rounds the same.
        full_precision (default: the family's) keeps them float32 and rotates in float32."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        if self.full_precision if full_precision is None else full_precision:
            return cos, sin
        return cos.to(dtype), sin.to(dtype)

    def apply(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        src = t.float() if cos.dtype == torch.float32 else t  # float32 tables: rotate in float32
        half = src.shape[-1] // 2
        rotated = torch.cat((-src[..., half:], src[..., :half]), dim=-1)
        return ((src * cos) + (rotated * sin)).to(t.dtype)


class Layer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, kv = spec.hidden_size, spec.num_kv_heads * spec.head_dim
        self.attn_norm = RMSNorm(h, spec.rms_norm_eps)
        self.q_proj = nn.Linear(h, h, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(h, kv, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(h, kv, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.ffn_norm = RMSNorm(h, spec.rms_norm_eps)
        self.gate_proj = nn.Linear(h, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, h, bias=False)


@dataclass
class AttnGroup:
    """Requests whose rows share one padded attention call: n real rows, at packed rows [n0, n1), laid out as
    [b, T] (requests of similar row counts are grouped, so one request's whole-window refresh does not pad every
    other request's few active rows up to its size: attention costs b x T x K per call)."""

    n0: int
    n1: int
    T: int
    keys: torch.Tensor  # [b, K] pool slots each request's rows attend to (padding: the scratch slot)
    mask: torch.Tensor | None  # [b, 1, T, K] True = visible; None: every key visible
    rows: torch.Tensor | None  # [n] each real row's index in the flattened [b, T] grid; None: no padding rows


@dataclass
class Ragged:
    """A packed batch over a KVPool: N real rows of B requests back to back (no padding rows)."""

    slots: torch.Tensor  # [N] pool rows their K/V are written to (pad rows: the scratch slot)
    groups: list[AttnGroup]  # covering [0, N - pad) in order
    logits_rows: torch.Tensor  # [M' >= M] packed row of every row whose logits are returned (padding: any row)
    logits_count: int  # M: the real ones, first
    pad: int = 0  # rows at the end that belong to no request (N is rounded up to few distinct sizes)
    rope_working: torch.Tensor | None = None  # bool [N]: rows rotated in the working dtype (others: the rule's)


@dataclass
class ForwardBatch:
    """What one model call computes.

    ids, positions: [B, T] query tokens and their absolute positions.
    cache: per-request K/V store; None means "attend only among these T rows" (a cache-free full forward).
    keys: which cache slots each row may attend to: None = slots [0, key_len); else LongTensor [B, K].
    key_len: with keys None, attend to the first key_len slots (default: all written so far is the caller's job).
    attn_mask: optional bool [B, 1, T, K], True = visible, for ragged batches; None = every key visible.
    logits_rows: LongTensor [B, R] of row indices into T to return logits for; None = all T rows.
    valid: optional bool [B, T], False on padding rows of a ragged batch: their K/V go to the cache's scratch
        slot instead of overwriting a real position (their outputs are garbage and must be ignored).
    slots: where rows write K/V when the cache is a shared pool (engine.model.kv_pool): the runner has translated
        positions (and keys) into pool slots; positions still drive RoPE.
    ragged: the serving engine's packed layout (see `Ragged`): ids and positions are [1, N], the real rows of
        all requests back to back; everything but attention runs on them as they are.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    cache: KVCache | None = None
    keys: torch.Tensor | None = None
    key_len: int | None = None
    attn_mask: torch.Tensor | None = None
    logits_rows: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    rope_full_precision: bool | None = None  # None: the family's rule; False: rotate in the working dtype
    slots: torch.Tensor | None = None  # [B, T] cache slots to write (a shared pool's); None: the positions
    ragged: Ragged | None = None

    def write_slots(self) -> torch.Tensor:
        if self.slots is not None:
            return self.slots
        if self.valid is None or self.cache is None:
            return self.positions
        return torch.where(self.valid, self.positions, torch.full_like(self.positions, self.cache.scratch))


class DiffusionLM(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Layer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.rope = Rope(spec)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        s = self.spec
        return KVCache(s.num_layers, batch, s.num_kv_heads, capacity, s.head_dim, self.dtype, self.device)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Plain full forward: [B, L] ids at positions 0..L-1, all keys visible -> [B, L, vocab] raw logits.
        (No grad mode is set here, so training uses the same code; decoding methods run under inference_mode.)"""
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return self.forward(ForwardBatch(ids=ids, positions=pos))

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        if fb.ragged is not None:
            # [N, H] -> [M', H] requested rows -> [M', V] -> [M, V]
            logits = self.lm_head(self._ragged_hidden_states(fb)[fb.ragged.logits_rows])
            return logits[: fb.ragged.logits_count]
        x = self.hidden_states(fb)
        if fb.logits_rows is not None:
            # [B, T, H] -> [B, R, H]: only the rows whose predictions the caller will read.
            x = torch.gather(x, 1, fb.logits_rows[..., None].expand(-1, -1, x.shape[-1]))
        return self.lm_head(x)

    def hidden_states(self, fb: ForwardBatch) -> torch.Tensor:
        """The final normed hidden states [B, T, H]; lm_head of a row gives its logits."""
        x = self.embed(fb.ids)  # [B, T, H]
        cos, sin = self.rope.tables(fb.positions, x.dtype, fb.rope_full_precision)  # [B, 1, T, hd]
        slots = fb.write_slots()
        for i, layer in enumerate(self.layers):
            x = x + self._attention(i, layer, layer.attn_norm(x), cos, sin, slots, fb)
            x = x + self._mlp(layer, x)
        return self.norm(x)

    def _mlp(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        h = layer.ffn_norm(x)
        return layer.down_proj(F.silu(layer.gate_proj(h)) * layer.up_proj(h))

    def _attention(self, i: int, layer: Layer, h, cos, sin, slots, fb: ForwardBatch) -> torch.Tensor:
        s = self.spec
        B, T = fb.ids.shape

        def proj(lin, heads, rotate: bool):  # -> [B, heads, T, hd]
            y = lin(h).view(B, T, heads, s.head_dim).transpose(1, 2)
            return self.rope.apply(y, cos, sin) if rotate else y

        q, k = proj(layer.q_proj, s.num_heads, True), proj(layer.k_proj, s.num_kv_heads, True)
        v = proj(layer.v_proj, s.num_kv_heads, False)
        if fb.cache is not None:
            fb.cache.write(i, slots, k, v)
            k, v = fb.cache.read(i, fb.keys, fb.key_len)
        att = F.scaled_dot_product_attention(q, *self._gqa(k, v), attn_mask=fb.attn_mask, is_causal=False)
        # [B, heads, T, hd] -> [B, T, H]
        return layer.o_proj(att.transpose(1, 2).contiguous().view(B, T, s.hidden_size))

    def _gqa(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, kv_heads, K, hd] -> [B, heads, K, hd], each kv head serving a contiguous group of q heads."""
        rep = self.spec.num_heads // self.spec.num_kv_heads
        return (k, v) if rep == 1 else (k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1))

    # -- the serving engine's packed layout --------------------------------------------------------------------
    def _ragged_hidden_states(self, fb: ForwardBatch) -> torch.Tensor:
        """ids, positions [1, N] (fb.ragged says whose rows they are) -> final normed hidden states [N, H]. Every
        layer but attention is row-wise, so it runs on the N real rows; K/V go straight to their pool rows."""
        s, rg = self.spec, fb.ragged
        x = self.embed(fb.ids[0])  # [N, H]
        rotate = self._ragged_rope(fb, x.dtype)
        for i, layer in enumerate(self.layers):
            h = layer.attn_norm(x)
            q = rotate(layer.q_proj(h).view(-1, s.num_heads, s.head_dim))  # [N, heads, hd]
            k = rotate(layer.k_proj(h).view(-1, s.num_kv_heads, s.head_dim))
            fb.cache.write_rows(i, rg.slots, k.view(k.shape[0], -1), layer.v_proj(h))
            parts = [self._group_attention(i, q[g.n0:g.n1], g, fb.cache) for g in rg.groups]
            if rg.pad:
                parts.append(x.new_zeros(rg.pad, s.hidden_size))
            x = x + layer.o_proj(parts[0] if len(parts) == 1 else torch.cat(parts))
            x = x + self._mlp(layer, x)
        return self.norm(x)

    def _ragged_rope(self, fb: ForwardBatch, dtype: torch.dtype):
        """-> rotate(t [N, heads, hd]) at the packed rows' positions, each row by its own precision rule."""
        def tables(rule):  # [1, 1, N, hd] -> [N, 1, hd]: broadcast over the heads of each row
            cos, sin = self.rope.tables(fb.positions, dtype, rule)
            return cos[0, 0, :, None], sin[0, 0, :, None]

        cos, sin = tables(fb.rope_full_precision)
        working = fb.ragged.rope_working
        if working is None:
            return lambda t: self.rope.apply(t, cos, sin)
        cos_w, sin_w = tables(False)
        return lambda t: torch.where(working[:, None, None], self.rope.apply(t, cos_w, sin_w),
                                     self.rope.apply(t, cos, sin))

    def _group_attention(self, i: int, q: torch.Tensor, g: AttnGroup, cache) -> torch.Tensor:
        """q [n, heads, hd], one group's packed rows -> their attention output [n, H]."""
        s = self.spec
        b = g.keys.shape[0]
        q = q.reshape(q.shape[0], -1)  # [n, H]
        if g.rows is not None:
            q = _unpack(q, g.rows, b, g.T)  # [b, T, H], zeros on the padding rows
        q = q.view(b, g.T, s.num_heads, s.head_dim).transpose(1, 2)  # [b, heads, T, hd]
        att = F.scaled_dot_product_attention(q, *self._gqa(*cache.read(i, g.keys)), attn_mask=g.mask)
        att = att.transpose(1, 2).reshape(b * g.T, s.hidden_size)  # [b, heads, T, hd] -> [b*T, H]
        return att if g.rows is None else att[g.rows]


def _unpack(x: torch.Tensor, rows: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Packed [N, D] rows -> [B, T, D] with zeros on the padding rows."""
    out = x.new_zeros(B * T, x.shape[-1])
    return out.index_copy_(0, rows, x).view(B, T, -1)


def span_forward(model: DiffusionLM, ids: torch.Tensor, start: int, cache: KVCache | None = None,
                 key_len: int | None = None) -> torch.Tensor:
    """Forward a contiguous span: ids [B, T] at positions start..start+T-1, writing into `cache` and attending to
    its slots [0, key_len). Without a cache the span attends only to itself. Returns raw logits [B, T, vocab]."""
    pos = torch.arange(start, start + ids.shape[1], device=ids.device).expand_as(ids)
    return model.forward(ForwardBatch(ids=ids, positions=pos, cache=cache, key_len=key_len))
