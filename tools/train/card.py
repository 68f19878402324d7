"""Model cards for the bundled models: what they are, how they were trained, and what they score."""

from __future__ import annotations

import json
from pathlib import Path


def write_card(out: Path, title: str, summary: str, data: str, command: str, record: dict,
               scores: dict, samples: list[tuple[str, str]]) -> None:
    cfg = json.loads((out / "config.json").read_text())
    size_mb = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 1e6
    lines = [f"# {title}", "", summary, "",
             "## Model", "",
             f"- Architecture: LLaDA layout (bidirectional Llama-style transformer, masked diffusion), "
             f"{cfg['n_layers']} layers, d_model {cfg['d_model']}, {cfg['n_heads']} heads, SwiGLU "
             f"{cfg['mlp_hidden_size']}, vocabulary {cfg['vocab_size']}.",
             f"- Parameters: {record['params']:,}; weights in bf16 safetensors; files {size_mb:.1f} MB.",
             f"- Special ids: mask {cfg['mask_token_id']}, EOS {cfg['eos_token_id']}, BOS {cfg['bos_token_id']}, "
             f"EoT {cfg['eot_token_id']}.", "",
             "## Data", "", data, "",
             "## Training", "",
             f"    {command}", "",
             "- Objective: LLaDA's masked-diffusion loss (t ~ U(eps, 1), 1/t weighting; answers only for chat rows).",
             f"- Config: `{json.dumps(record['train_config'])}`",
             f"- Wall time: {record['wall_time_s'] / 60:.1f} minutes on 2 CPU cores "
             f"({'bf16 autocast' if record.get('autocast_bf16', True) else 'float32'})"
             + (f"; {record['note']}" if record.get("note") else "") + ".", "",
             "## Scores", ""]
    lines += [f"- {k}: {v}" for k, v in scores.items()]
    if samples:
        lines += ["", "## Samples", ""]
        for prompt, text in samples:
            lines += [f"Prompt: `{prompt}`", "", "```", text, "```", ""]
    (out / "README.md").write_text("\n".join(lines) + "\n")
