"""bench.task_probe scores what it claims: an oracle that counts right gets every probe right, one that ignores the
prompt gets none, and the canvas probe reports the first number per canvas size."""

from __future__ import annotations

import torch

from bench import task_probe
from diffuserve.tools.train import task_data as tk


class Oracle:
    """Logits one-hot on the right count answer for the prompt in the row (or on one fixed token: `blind`)."""

    def __init__(self, blind: bool = False):
        self.blind = blind

    def forward(self, fb):
        row = fb.ids[0].tolist()
        words = [(tk.SPECIALS + tk.WORDS)[i] for i in row]
        start = tk.value(words[5:5 + tk.DIGITS])  # <bos> <user> count down from w x y z <assistant>
        want = tk.count_answer(start)
        ids = tk.TaskBatches(0).encode(words[:6 + tk.DIGITS] + want) + [tk.EOS] * len(row)
        target = torch.tensor(ids[:len(row)])
        if self.blind:
            target = torch.full_like(target, tk.EOS)
        return torch.nn.functional.one_hot(target, tk.vocab_size()).float()[None]  # [1, L, V]


def test_an_oracle_passes_every_probe_and_a_blind_model_none():
    assert task_probe.next_number(Oracle(), 12, first=False) == 12
    assert task_probe.next_number(Oracle(), 12, first=True) == 12
    assert task_probe.next_number(Oracle(blind=True), 12, first=False) == 0
    assert task_probe.block0(Oracle(), starts=(45, 206), block=12, canvas=64)["right"] == "2/2"
    blind = task_probe.block0(Oracle(blind=True), starts=(45,), block=12, canvas=64)
    assert blind["right"] == "0/1" and blind["wrong"] == ["45: " + " ".join(["<|endoftext|>"] * 12)]
    cue = task_probe.canvas_cue(Oracle(), starts=(45, 206))
    assert cue == {s: {c: s for c in task_probe.CANVASES} for s in (45, 206)}
    assert set(task_probe.canvas_cue(Oracle(blind=True), starts=(45,))[45].values()) == {-1}
