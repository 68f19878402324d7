"""Canvas events: what one engine step did to a request's canvas, for the live denoising view.

A request that asks (`stream_options.include_canvas`) gets one event per step it was computed in, whatever its
method: the engine diffs the generated part of the canvas around the state's `commit`, so every method has the view
without knowing of it. An event says which positions settled this step (with their tokens and the model's
probability for them at that step), which went back to a mask (none of today's methods does), how long the canvas
is now (an EOS early exit shortens it), the step's phase and query rows, and, for methods that partition the
undecoded positions (`DecodeState.partition`: window), the active / buffer / far-field positions the next step
works with, as [start, end) runs. Replaying the events from an all-mask canvas gives exactly the final canvas.
Positions count from the first generated position. With `full`, each event also carries the whole canvas.
"""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F


class CanvasView:
    def __init__(self, full: bool = False):
        self.full = full
        self.steps = 0
        self.before: np.ndarray | None = None

    def snapshot(self, state) -> None:
        """Before the commit: the generated part as it stands."""
        self.before = state.canvas().numpy().copy()

    def event(self, state, plan, result) -> dict:
        """After the commit: what changed since `snapshot`."""
        after = state.canvas().numpy()
        before, n = self.before, min(len(self.before), len(after))
        changed = np.flatnonzero(before[:n] != after[:n])
        mask = state.spec.mask_id
        settled = changed[after[changed] != mask]
        conf = _confidences(state, plan, result, settled, after[settled])
        self.steps += 1
        parts = state.partition()
        phase = "refresh" if plan.refresh else ("pruned" if parts is not None else "step")
        ev = {"step": self.steps, "phase": phase, "rows": plan.rows, "length": len(after),
              "committed": [[int(p), int(t), c] for p, t, c in zip(settled, after[settled], conf)],
              "masks": int((after == mask).sum())}
        remasked = changed[after[changed] == mask]
        if len(remasked):
            ev["remasked"] = remasked.tolist()
        if parts is not None:
            ev["partition"] = {name: _runs(pos - state.prompt_len) for name, pos in parts.items()}
        if self.full:
            ev["canvas"] = after.tolist()
        return ev


def _confidences(state, plan, result, settled: np.ndarray, tokens: np.ndarray) -> list[float | None]:
    """The model's probability of each settled token at the row that predicted it this step (None where no row of
    this step did: a method may commit what an earlier step predicted)."""
    if not len(settled):
        return []
    shift = int(state.spec.shifted_logits)  # Dream: the row at position p - 1 predicts p
    where: dict[int, tuple[int, int]] = {}
    for s, seg in enumerate(plan.segments):
        if s >= len(result.rows):
            break
        for r, p in enumerate(seg.positions[seg.logits_rows] + shift - state.prompt_len):
            where.setdefault(int(p), (s, r))
    out: list[float | None] = []
    for p, t in zip(settled.tolist(), tokens.tolist()):
        if p not in where:
            out.append(None)
            continue
        s, r = where[p]
        prob = F.softmax(result.rows[s].logits[r].float(), dim=-1)[t]
        out.append(round(float(prob), 4))
    return out


def _runs(pos: np.ndarray) -> list[list[int]]:
    """Ascending positions -> [start, end) runs: [3, 4, 5, 9] -> [[3, 6], [9, 10]]."""
    if not len(pos):
        return []
    breaks = np.flatnonzero(np.diff(pos) != 1)
    starts = np.concatenate([[pos[0]], pos[breaks + 1]])
    ends = np.concatenate([pos[breaks], [pos[-1]]]) + 1
    return np.stack([starts, ends], axis=1).tolist()


def replay(gen_length: int, mask_id: int, events: list[dict]) -> list[int]:
    """The canvas the events describe, from an all-mask canvas of gen_length positions."""
    canvas = [mask_id] * gen_length
    for ev in events:
        for c in ev["committed"]:  # [position, token, probability] (the server adds the token's text)
            canvas[c[0]] = c[1]
        for p in ev.get("remasked", []):
            canvas[p] = mask_id
        canvas = canvas[: ev["length"]]
    return canvas


__all__ = ["CanvasView", "replay"]
