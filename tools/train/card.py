"""Model cards for the bundled models: what they are, how they were trained, and what they score."""

from __future__ import annotations

import json
from pathlib import Path


def write_card(out: Path, title: str, summary: str, data: str, command: str, record: dict,
               scores: dict, samples: list[tuple[str, str]]) -> None:
    from diffuserve.engine.model.spec import load_spec

    spec = load_spec(out)  # either family's config.json
    layout = {"llada": "LLaDA layout (bidirectional Llama-style transformer, masked diffusion)",
              "dream": "Dream layout (bidirectional Qwen2-style transformer with q/k/v biases, masked diffusion, "
                       "position p predicted by output row p - 1)"}[spec.family]
    size_mb = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 1e6
    lines = [f"# {title}", "", summary, "",
             "## Model", "",
             f"- Architecture: {layout}, {spec.num_layers} layers, d_model {spec.hidden_size}, {spec.num_heads} heads, "
             f"SwiGLU {spec.intermediate_size}, vocabulary {spec.vocab_size}.",
             f"- Parameters: {record['params']:,}; weights in bf16 safetensors; files {size_mb:.1f} MB.",
             f"- Special ids: mask {spec.mask_id}, EOS {spec.eos_id}, BOS {spec.bos_id}"
             + (f", EoT {spec.eot_id}." if spec.eot_id is not None else "."), "",
             "## Data", "", data, "",
             "## Training", "",
             f"    {command}", "",
             "- Objective: LLaDA's masked-diffusion loss (t ~ U(eps, 1), 1/t weighting; answers only for chat rows)"
             + ("; each position's loss read from output row p - 1, as Dream decodes." if spec.shifted_logits
                else "."),
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
